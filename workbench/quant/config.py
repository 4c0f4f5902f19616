"""The quantization config: which linear layers get which format, validated in one place.

    bits: 2              # 1.58 (or "ternary"), 1, 2, 3 or 4
    group_size: 64       # inputs per scale (and zero); must divide every quantized layer's row
    method: hqq          # ternary: absmean | lsq;  1-4 bits: rtn | hqq
    skip: [lm_head]      # module-name patterns (regular expressions, searched) left in float
    layers:              # per-layer overrides; the first pattern found in the module name wins
      - {pattern: 'mlp\\.down_proj', bits: 4}
      - {pattern: 'layers\\.0\\.', skip: true}
      - {pattern: 'mlp\\.up_proj', rank: 32}   # a layer's own adapter rank (a searched config's way)
    lora: {rank: 16, alpha: 16, init: svd}   # adapters on every quantized layer (rank 0: none)
    storage: packed      # on disk: "packed" (2 bits per ternary code) or "trits" (1.6 bits)
    embeddings: float32  # token embeddings and output head: float32 or bfloat16 (half the bytes)

Errors name the file, the line and the field; `check_model` names every layer a setting cannot
apply to, before any weight is quantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from workbench.errors import WorkbenchError
from workbench.quant.quantizers import ASYM_METHODS, TERNARY_METHODS
from workbench.yaml_lines import field_location, parse_with_lines

BITS = (1, 1.58, 2, 3, 4)
TOP_KEYS = {"bits", "group_size", "method", "skip", "layers", "lora", "storage", "seed", "embeddings"}
LAYER_KEYS = {"pattern", "bits", "group_size", "method", "skip", "rank"}
LORA_KEYS = {"rank", "alpha", "init"}


class QuantConfigError(WorkbenchError, ValueError):
    """A quantization config that does not validate."""


@dataclass
class LayerSetting:
    """What one linear layer becomes."""
    kind: str  # "ternary" | "asym"
    bits: int  # code bits (2 for ternary)
    group_size: int
    method: str
    nominal_bits: float  # 1.58 for ternary
    rank: int = 0  # LoRA adapter rank (0: none)

    @property
    def label(self) -> str:
        return "ternary" if self.kind == "ternary" else f"{self.bits}bit"


@dataclass
class LoraConfig:
    rank: int = 0
    alpha: float | None = None
    init: str = "svd"


@dataclass
class QuantConfig:
    bits: float = 2
    group_size: int = 64
    method: str | None = None
    skip: list[str] = field(default_factory=lambda: ["lm_head"])
    layers: list[dict] = field(default_factory=list)
    lora: LoraConfig = field(default_factory=LoraConfig)
    storage: str = "packed"
    embeddings: str = "float32"
    seed: int = 0
    source: str = "<config>"

    def setting_for(self, module_name: str) -> LayerSetting | None:
        """The setting of a module, or None when it stays in float."""
        values = {"bits": self.bits, "group_size": self.group_size, "method": self.method, "skip": False,
                  "rank": self.lora.rank}
        if any(re.search(p, module_name) for p in self.skip):
            values["skip"] = True
        for rule in self.layers:
            if re.search(rule["pattern"], module_name):
                values.update({k: v for k, v in rule.items() if k != "pattern"})
                break
        if values["skip"]:
            return None
        s = _setting(values["bits"], values["group_size"], values["method"])
        s.rank = values["rank"]
        return s

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "method": self.method, "skip": self.skip,
                "layers": self.layers, "lora": {"rank": self.lora.rank, "alpha": self.lora.alpha,
                                                "init": self.lora.init},
                "storage": self.storage, "embeddings": self.embeddings, "seed": self.seed}


def _setting(bits: float, group_size: int, method: str | None) -> LayerSetting:
    if bits == 1.58:
        return LayerSetting("ternary", 2, group_size, method or "lsq", 1.58)
    return LayerSetting("asym", int(bits), group_size, method or "hqq", float(bits))


def load_quant_config(path: str | Path) -> QuantConfig:
    path = Path(path)
    if not path.is_file():
        raise QuantConfigError(f"{path}: quantization config not found")
    data, lines = parse_with_lines(path.read_text(), str(path), QuantConfigError)
    return quant_config_from_dict(data, str(path), lines)


def quant_config_from_dict(data: Any, source: str = "<config>", lines: dict | None = None) -> QuantConfig:
    lines = lines or {}

    def fail(path: tuple, msg: str):
        field_name = ".".join(str(p) for p in path) or "config"
        raise QuantConfigError(f"{field_location(source, lines, path)}: {field_name}: {msg}")

    if not isinstance(data, dict):
        fail((), "expected a mapping with at least `bits`")
    for key in data:
        if key not in TOP_KEYS:
            fail((key,), f"unknown key; expected one of {sorted(TOP_KEYS)}")
    cfg = QuantConfig(source=source)
    cfg.bits = _bits(data.get("bits", 2), ("bits",), fail)
    cfg.group_size = _group(data.get("group_size", 64), ("group_size",), fail)
    cfg.method = _method(data.get("method"), cfg.bits, ("method",), fail)
    skip = data.get("skip", ["lm_head"])
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        fail(("skip",), "expected a list of module-name patterns")
    cfg.skip = [_pattern(s, ("skip", i), fail) for i, s in enumerate(skip)]
    layers = data.get("layers", [])
    if not isinstance(layers, list):
        fail(("layers",), "expected a list of {pattern, bits, group_size, method, skip}")
    for i, rule in enumerate(layers):
        if not isinstance(rule, dict) or "pattern" not in rule:
            fail(("layers", i), "expected a mapping with a `pattern`")
        for key in rule:
            if key not in LAYER_KEYS:
                fail(("layers", i, key), f"unknown key; expected one of {sorted(LAYER_KEYS)}")
        r = {"pattern": _pattern(rule["pattern"], ("layers", i, "pattern"), fail)}
        if "bits" in rule:
            r["bits"] = _bits(rule["bits"], ("layers", i, "bits"), fail)
        if "group_size" in rule:
            r["group_size"] = _group(rule["group_size"], ("layers", i, "group_size"), fail)
        if "method" in rule:
            r["method"] = _method(rule["method"], r.get("bits", cfg.bits), ("layers", i, "method"), fail)
        elif "bits" in rule and (rule["bits"] == 1.58) != (cfg.bits == 1.58):
            r["method"] = None  # the global method belongs to the other kind
        if "skip" in rule:
            if not isinstance(rule["skip"], bool):
                fail(("layers", i, "skip"), "expected true or false")
            r["skip"] = rule["skip"]
        if "rank" in rule:
            if not isinstance(rule["rank"], int) or isinstance(rule["rank"], bool) or rule["rank"] < 0:
                fail(("layers", i, "rank"), f"expected a non-negative integer, got {rule['rank']!r}")
            r["rank"] = rule["rank"]
        cfg.layers.append(r)
    lora = data.get("lora", {}) or {}
    if not isinstance(lora, dict):
        fail(("lora",), "expected a mapping {rank, alpha, init}")
    for key in lora:
        if key not in LORA_KEYS:
            fail(("lora", key), f"unknown key; expected one of {sorted(LORA_KEYS)}")
    rank = lora.get("rank", 0)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        fail(("lora", "rank"), f"expected a non-negative integer, got {rank!r}")
    alpha = lora.get("alpha")
    if alpha is not None and (not isinstance(alpha, (int, float)) or alpha <= 0):
        fail(("lora", "alpha"), f"expected a positive number, got {alpha!r}")
    init = lora.get("init", "svd")
    if init not in ("svd", "zeros"):
        fail(("lora", "init"), f"expected 'svd' or 'zeros', got {init!r}")
    cfg.lora = LoraConfig(rank, alpha, init)
    storage = data.get("storage", "packed")
    if storage not in ("packed", "trits"):
        fail(("storage",), f"expected 'packed' or 'trits', got {storage!r}")
    cfg.storage = storage
    embeddings = data.get("embeddings", "float32")
    if embeddings not in ("float32", "bfloat16"):
        fail(("embeddings",), f"expected 'float32' or 'bfloat16', got {embeddings!r}")
    cfg.embeddings = embeddings
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        fail(("seed",), f"expected an integer, got {seed!r}")
    cfg.seed = seed
    return cfg


def _bits(v: Any, path: tuple, fail) -> float:
    if v == "ternary" or v == "1.58":
        return 1.58
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v not in BITS:
        fail(path, f"unknown bits {v!r}; expected one of 1.58 (ternary), 1, 2, 3, 4")
    return 1.58 if v == 1.58 else int(v)


def _group(v: Any, path: tuple, fail) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 2:
        fail(path, f"expected an integer >= 2, got {v!r}")
    return v


def _method(v: Any, bits: float, path: tuple, fail) -> str | None:
    if v is None:
        return None
    allowed = TERNARY_METHODS if bits == 1.58 else ASYM_METHODS
    if v not in allowed:
        kind = "ternary" if bits == 1.58 else f"{bits}-bit"
        fail(path, f"unknown method {v!r} for {kind}; expected one of {list(allowed)}")
    return v


def _pattern(v: Any, path: tuple, fail) -> str:
    if not isinstance(v, str):
        fail(path, f"expected a regular expression string, got {v!r}")
    try:
        re.compile(v)
    except re.error as e:
        fail(path, f"not a valid regular expression: {e}")
    return v


def check_model(cfg: QuantConfig, linears: dict[str, tuple[int, int]]) -> dict[str, LayerSetting]:
    """Resolve every linear layer's setting; refuse (listing all of them) layers a group cannot fit.

    `linears` maps module name -> (out_features, in_features)."""
    settings, problems = {}, []
    for name, (out_f, in_f) in linears.items():
        s = cfg.setting_for(name)
        if s is None:
            continue
        if in_f % s.group_size:
            problems.append(f"  {name}.weight [{out_f}, {in_f}]: group_size {s.group_size} does not divide "
                            f"the row length {in_f}")
        settings[name] = s
    if problems:
        raise QuantConfigError(f"{cfg.source}: group_size: cannot quantize {len(problems)} layer(s):\n"
                               + "\n".join(problems))
    if not settings:
        raise QuantConfigError(f"{cfg.source}: no linear layer is left to quantize (check `skip` and `layers`)")
    return settings
