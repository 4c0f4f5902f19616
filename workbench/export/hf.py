"""Plain float exports of a quantized model: dequantized weights, with or without the adapters merged."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from workbench.atomic import atomic_dir
from workbench.faults import fault_point
from workbench.quant.model import COPY_FILES, empty_model, quant_layers


def dequantized_model(qmodel: nn.Module, qdir: str | Path, merge_adapters: bool,
                      dtype: torch.dtype = torch.float32) -> nn.Module:
    """A plain transformers model on the CPU whose quantized layers hold their dequantized weights
    (plus B @ A * scaling when `merge_adapters`), with the original module types (Linear or Conv1D).
    The dequantization and merge run where `qmodel` is (a CUDA model: on its device)."""
    model = empty_model(qdir, dtype)
    state = {k: v.cpu() for k, v in qmodel.state_dict().items()}
    qlayers = quant_layers(qmodel)
    plain = {}
    for name, t in state.items():
        if name.rpartition(".")[0] not in qlayers:
            plain[name] = t
    for name, q in qlayers.items():
        w = q.merged_weight(dtype) if merge_adapters else q.dequantized_weight(dtype)
        target = model.get_submodule(name)
        w = w.cpu()
        plain[f"{name}.weight"] = w.t().contiguous() if type(target).__name__ == "Conv1D" else w
        if q.bias is not None:
            plain[f"{name}.bias"] = q.bias.detach().to(dtype).cpu()
    missing, unexpected = model.load_state_dict(plain, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight")}
    if set(missing) - tied - {n for n in missing if n.endswith("inv_freq")} or unexpected:
        raise RuntimeError(f"dequantized model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def save_plain(model: nn.Module, qdir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """save_pretrained (safetensors) atomically, with the tokenizer files of the quantized directory."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        fault_point("export:hf-weights")
        for f in COPY_FILES:
            src = Path(qdir) / f
            if src.is_file() and not (tmp / f).exists():
                shutil.copy2(src, tmp / f)
    return Path(out)


def export_hf(qmodel: nn.Module, qdir: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Dequantized weights with the adapters merged: loads anywhere with `from_pretrained`."""
    save_plain(dequantized_model(qmodel, qdir, merge_adapters=True), qdir, out, overwrite)
    return {"format": "hf", "path": str(out), "bytes": _dir_bytes(out)}


def _dir_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
