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
from workbench.schema import Field, Reader, parse_with_lines

BITS = (1, 1.58, 2, 3, 4)


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


def _bits(v: Any, path: tuple, fail) -> float:
    if v == "ternary" or v == "1.58":
        return 1.58
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v not in BITS:
        fail(path, f"unknown bits {v!r}; expected one of 1.58 (ternary), 1, 2, 3, 4")
    return 1.58 if v == 1.58 else int(v)


def _method(v: Any, bits: float, path: tuple, fail) -> str | None:
    if v is None:
        return None
    allowed = TERNARY_METHODS if bits == 1.58 else ASYM_METHODS
    if v not in allowed:
        kind = "ternary" if bits == 1.58 else f"{bits}-bit"
        fail(path, f"unknown method {v!r} for {kind}; expected one of {list(allowed)}")
    return v


def _pattern(v: str, path: tuple, fail) -> str:
    try:
        re.compile(v)
    except re.error as e:
        fail(path, f"not a valid regular expression: {e}")
    return v


def _patterns(v: list[str], path: tuple, fail) -> list[str]:
    return [_pattern(p, (*path, i), fail) for i, p in enumerate(v)]


# The fields shared with the quantization search spec (workbench/quant/search/spec.py).
BITS_FIELD = Field(object, 2, check=_bits, doc="1.58 (or 'ternary'), 1, 2, 3 or 4")
GROUP_SIZE = Field(int, 64, low=2, doc="inputs per scale (and zero)")
LORA_INIT = Field(str, "svd", choices=("svd", "zeros"), want="'svd' or 'zeros'")
SKIP = Field(list, ["lm_head"], item=str, check=_patterns, msg="expected a list of module-name patterns")

LAYER = {  # a per-layer rule; only the keys it sets override the global ones
    "pattern": Field(str, want="a regular expression string", check=_pattern),
    "bits": BITS_FIELD, "group_size": GROUP_SIZE, "method": Field(object, None),
    "skip": Field(bool, False, msg="expected true or false"), "rank": Field(int, 0, low=0),
}
CONFIG = Field(dict, msg="expected a mapping with at least `bits`", fields={
    "bits": BITS_FIELD, "group_size": GROUP_SIZE, "method": Field(object, None), "skip": SKIP,
    "layers": Field(list, [], msg="expected a list of {pattern, bits, group_size, method, skip}",
                    item=Field(dict, fields=LAYER, msg="expected a mapping with a `pattern`")),
    "lora": Field(dict, {}, msg="expected a mapping {rank, alpha, init}", make=LoraConfig, fields={
        "rank": Field(int, 0, low=0), "alpha": Field(float, None, positive=True), "init": LORA_INIT}),
    "storage": Field(str, "packed", choices=("packed", "trits"), want="'packed' or 'trits'"),
    "embeddings": Field(str, "float32", choices=("float32", "bfloat16"), want="'float32' or 'bfloat16'"),
    "seed": Field(int, 0),
})


def quant_config_from_dict(data: Any, source: str = "<config>", lines: dict | None = None) -> QuantConfig:
    r = Reader(source, lines, QuantConfigError, root="config")
    c = r.check(data, CONFIG)
    c["method"] = _method(c["method"], c["bits"], ("method",), r.fail)
    layers = []
    for i, (raw, rule) in enumerate(zip(data.get("layers") or [], c["layers"])):
        rule = {k: v for k, v in rule.items() if raw.get(k) is not None}  # only what the rule sets
        if "method" in rule:
            rule["method"] = _method(rule["method"], rule.get("bits", c["bits"]), ("layers", i, "method"), r.fail)
        elif "bits" in rule and (rule["bits"] == 1.58) != (c["bits"] == 1.58):
            rule["method"] = None  # the global method belongs to the other kind
        layers.append(rule)
    return QuantConfig(**{**c, "layers": layers}, source=source)


def check_model(cfg: QuantConfig, linears: dict[str, tuple[int, int]]) -> dict[str, LayerSetting]:
    """Resolve every linear layer's setting; refuse (listing all of them) layers a group cannot fit.

    `linears` maps module name -> (out_features, in_features)."""
    settings, problems = {}, {}   # (group size, row length) -> tensors
    for name, (out_f, in_f) in linears.items():
        s = cfg.setting_for(name)
        if s is None:
            continue
        if in_f % s.group_size:
            problems.setdefault((s.group_size, in_f), []).append(f"{name}.weight [{out_f}, {in_f}]")
        settings[name] = s
    if problems:   # one line, however many layers: a group of 8 names per row length, then a count
        parts = [f"group_size {g} does not divide the row length {n} of " + ", ".join(names[:8])
                 + (f" and {len(names) - 8} more" if len(names) > 8 else "") for (g, n), names in problems.items()]
        count = sum(len(v) for v in problems.values())
        raise QuantConfigError(f"{cfg.source}: group_size: cannot quantize {count} layer(s): " + "; ".join(parts))
    if not settings:
        raise QuantConfigError(f"{cfg.source}: no linear layer is left to quantize (check `skip` and `layers`)")
    return settings
