"""The layer database: every (linear layer, format, rank) quantized once, cached on disk, swapped in.

As in EvoPress, nothing is re-quantized per candidate: each layer is quantized once per format and
its adapters SVD-initialised once per (format, rank), exactly as `quantize_model` does it (same
per-layer seed), so a candidate assembled from the database gives the logits of quantizing its
config from scratch. Files live in ``$WORKBENCH_HOME/quant-db/<key>/``, the key hashing the
model's weight files (so changed weights never reuse a stale entry), the skip list, the seed and
the adapter settings; one safetensors file per format and one per (format, rank > 0).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from workbench.atomic import atomic_path
from workbench.home import workbench_home
from workbench.quant import packing
from workbench.quant.linear import QuantLinear
from workbench.quant.model import float_weight, linear_layers, set_module
from workbench.quant.quantizers import quantize_weight
from workbench.quant.search.spec import Format, LayerOption, QuantSearchSpec, QuantSpecError

VERSION = 2  # bump when the stored tensors change meaning (2: the hqq package solves the zeros)


def quantized_layer_names(model: nn.Module, skip: list[str]) -> list[str]:
    """The linear layers a search quantizes, in `quantize_model`'s order (which sets their seeds)."""
    return [n for n in linear_layers(model) if not any(re.search(p, n) for p in skip)]


def layer_units(names: list[str], granularity: str) -> list[list[str]]:
    """Layers that share one gene: each alone, a decoder block's together, or one projection type's."""
    if granularity == "per_layer":
        return [[n] for n in names]
    groups: dict[str, list[str]] = {}
    for n in names:
        block = re.search(r"(.*\.\d+)\.", n)
        key = (block.group(1) if block else n) if granularity == "per_block" else n.rsplit(".", 1)[-1]
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def _format_key(f: Format) -> str:
    return f"b{f.bits}-g{f.group_size}-{f.method or 'default'}"


class LayerDatabase:
    """Quantized variants of every searched layer of `model` (a float model, left unchanged).

    `build` solves each weight on `device` (the files are the same on every device but for float
    rounding); `module` hands out the layers on `device`."""

    def __init__(self, model: nn.Module, model_dir: Path, spec: QuantSearchSpec, root: Path | None = None,
                 device: torch.device | str = "cpu"):
        from workbench.eval.kl import model_files_hash

        self.model, self.spec, self.device = model, spec, torch.device(device)
        self.names = quantized_layer_names(model, spec.skip)
        linears = linear_layers(model)
        self.weights = {n: float_weight(linears[n]) for n in self.names}
        self.bias = {n: getattr(linears[n], "bias", None) for n in self.names}
        bad = [f"  {n}.weight {list(self.weights[n].shape)}: group_size {f.group_size} ({f.label}) does not divide "
               f"the row length {self.weights[n].shape[1]}"
               for f in spec.formats for n in self.names if self.weights[n].shape[1] % f.group_size]
        if bad:
            raise QuantSpecError(f"{spec.source}: options.formats: {len(bad)} layer(s) cannot take a format:\n"
                                 + "\n".join(bad[:20]))
        if not self.names:
            raise QuantSpecError(f"{spec.source}: skip: no linear layer is left to search")
        settings = {"version": VERSION, "model": model_files_hash(model_dir), "skip": spec.skip, "seed": spec.seed,
                    "alpha": spec.lora_alpha, "init": spec.lora_init}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
        self.dir = (root or workbench_home() / "quant-db") / key
        self.options = spec.options
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._modules: dict[tuple[str, int], QuantLinear] = {}
        self.build_seconds = 0.0

    # -- building ---------------------------------------------------------------------------------
    def _file(self, fmt: Format, rank: int = 0) -> Path:
        return self.dir / (_format_key(fmt) + (f"-r{rank}" if rank else "") + ".safetensors")

    def build(self, progress: Callable[[str, int, int], None] | None = None) -> dict:
        """Quantize what is not on disk yet; return {"seconds", "bytes", "files", "built"}."""
        start, built = time.perf_counter(), 0
        ranks = [r for r in self.spec.ranks if r]
        jobs = [(f, r) for f in self.spec.formats for r in [0, *ranks] if not self._file(f, r).is_file()]
        self.dir.mkdir(parents=True, exist_ok=True)
        for fmt in self.spec.formats:
            todo = [r for r in [0, *ranks] if not self._file(fmt, r).is_file()]
            if not todo:
                continue
            base: dict[str, torch.Tensor] = {}
            lora: dict[int, dict[str, torch.Tensor]] = {r: {} for r in todo if r}
            for i, name in enumerate(self.names):
                w = self.weights[name].float().cpu()
                q = quantize_weight(w.to(self.device), fmt.bits, fmt.group_size, fmt.method).to("cpu")
                base[f"{name}.qweight"] = QuantLinear.from_quantized(q).qweight
                base[f"{name}.scale"], base[f"{name}.zero"] = q.scale, q.zero
                for r in lora:
                    m = QuantLinear.from_quantized(q, None, r, self.spec.lora_alpha)
                    m.init_lora(self.spec.lora_init, w, seed=self.spec.seed + i)
                    m.round_to_storage_()
                    lora[r][f"{name}.lora_A"] = m.lora_A.detach().half()
                    lora[r][f"{name}.lora_B"] = m.lora_B.detach().half()
                if progress:
                    progress(f"{fmt.label}: {name}", i + 1, len(self.names))
            if 0 in todo:
                self._save(base, self._file(fmt))
            for r, tensors in lora.items():
                self._save(tensors, self._file(fmt, r))
            built += len(todo)
        self.build_seconds = time.perf_counter() - start
        files = [self._file(f, r) for f in self.spec.formats for r in [0, *ranks]]
        return {"seconds": self.build_seconds, "built": built, "files": len(files), "jobs": len(jobs),
                "bytes": sum(p.stat().st_size for p in files), "dir": str(self.dir)}

    @staticmethod
    def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
        clean = {k: v.contiguous() for k, v in tensors.items() if v is not None}
        with atomic_path(path) as tmp:
            save_file(clean, str(tmp), metadata={"format": "pt", "workbench": "quant-db"})

    # -- reading ----------------------------------------------------------------------------------
    def _load(self, fmt: Format, rank: int) -> dict[str, torch.Tensor]:
        path = self._file(fmt, rank)
        if str(path) not in self._tensors:
            if not path.is_file():
                raise QuantSpecError(f"{path}: layer database entry missing; build the database first")
            self._tensors[str(path)] = load_file(str(path))
        return self._tensors[str(path)]

    def module(self, name: str, option: int) -> QuantLinear:
        """The layer `name` as option `option` on the database's device: a QuantLinear equal to what
        `quantize_model` makes."""
        key = (name, option)
        if key not in self._modules:
            self._modules[key] = self._build(name, option).to(self.device)
        return self._modules[key]

    def _build(self, name: str, option: int) -> QuantLinear:
        """The layer as option `option`, on the CPU."""
        opt = self.options[option]
        fmt, rank = opt.format, opt.rank
        w, bias = self.weights[name], self.bias[name]
        bias = None if bias is None else bias.cpu()
        kind = "ternary" if fmt.bits == 1.58 else "asym"
        m = QuantLinear(w.shape[1], w.shape[0], kind, 2 if kind == "ternary" else int(fmt.bits), fmt.group_size,
                        bias is not None, rank, self.spec.lora_alpha if rank else None)
        base = self._load(fmt, 0)
        m.qweight.copy_(base[f"{name}.qweight"])
        m.scale.data.copy_(base[f"{name}.scale"].float())
        if m.zero is not None:
            m.zero.data.copy_(base[f"{name}.zero"].float())
        if bias is not None:
            m.bias.data.copy_(bias.detach().float())
        if rank:
            lora = self._load(fmt, rank)
            m.lora_A.data.copy_(lora[f"{name}.lora_A"].float())
            m.lora_B.data.copy_(lora[f"{name}.lora_B"].float())
        m.round_to_storage_()
        m.requires_grad_(False)
        return m

    def relative_errors(self) -> tuple[list[str], "torch.Tensor"]:
        """(layer names, [layers, options] squared error of each option's weight, adapters folded in,
        and the float weight's squared norm as the last column): the move structure's prior."""
        out = torch.zeros(len(self.names), len(self.options) + 1, dtype=torch.float64)
        with torch.no_grad():
            for i, name in enumerate(self.names):
                w = self.weights[name].float().cpu()
                out[i, -1] = float((w * w).sum())
                for o in range(len(self.options)):
                    out[i, o] = float(((self._build(name, o).merged_weight() - w) ** 2).sum())
        return self.names, out

    def stored_bytes(self, name: str, option: int) -> tuple[int, int]:
        """(base bytes, adapter bytes) of a layer as option `option` is saved (codes packed, scales,
        zeros and adapters in float16), from its shape: known before anything is quantized (tests
        check it against the tensors a save writes)."""
        opt = self.options[option]
        out_f, in_f = self.weights[name].shape
        code_bits = 2 if opt.format.bits == 1.58 else int(opt.format.bits)
        groups = in_f // opt.format.group_size
        meta = 1 if opt.format.bits == 1.58 else 2  # scale (and zero), float16 each
        base = out_f * packing.packed_cols(in_f, code_bits) + 2 * meta * out_f * groups
        return base, 2 * opt.rank * (in_f + out_f)

    def assemble(self, target: nn.Module, choice: dict[str, int]) -> None:
        """Swap into `target` (a model of the same architecture) each layer's chosen variant."""
        for name, option in choice.items():
            set_module(target, name, self.module(name, option))

    def option_label(self, option: int) -> str:
        return self.options[option].label


def option_config(spec: QuantSearchSpec, choice: dict[str, int]) -> dict:
    """A quantization config (`workbench quantize --config`) that rebuilds `choice` exactly: one
    anchored rule per layer, the spec's skip list and seed (which set each layer's adapter init)."""
    options: list[LayerOption] = spec.options
    first = options[next(iter(choice.values()))]
    rules = []
    for name, o in choice.items():
        opt = options[o]
        rules.append({"pattern": "^" + re.escape(name) + "$", "bits": opt.format.bits,
                      "group_size": opt.format.group_size, "rank": opt.rank,
                      **({"method": opt.format.method} if opt.format.method else {})})
    return {"bits": first.format.bits, "group_size": first.format.group_size, "skip": list(spec.skip),
            "layers": rules, "lora": {"rank": 0, "alpha": spec.lora_alpha, "init": spec.lora_init},
            "seed": spec.seed}
