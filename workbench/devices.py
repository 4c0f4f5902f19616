"""The one device option: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when present, else CPU).

Every command that computes takes ``--device``; each resolves it here, before any long work starts,
so a bad value is one line naming the option and what was expected.
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError

CHOICES = "cpu, cuda, cuda:N or auto"


def resolve_device(spec: str | torch.device | None, option: str = "--device") -> torch.device:
    """The torch device ``spec`` names; ``auto`` (or None) is ``cuda`` when CUDA is present, else ``cpu``."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise WorkbenchError(f"{option} {spec}: expected {CHOICES}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise WorkbenchError(f"{option} {spec}: expected {CHOICES}")
    if not torch.cuda.is_available():
        raise WorkbenchError(f"{option} {spec}: CUDA is not available here; use {option} cpu (or auto)")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise WorkbenchError(f"{option} {spec}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return dev


def to_cpu(obj):
    """Tensors (in dicts and lists, e.g. an optimizer's state) moved to the CPU: what is saved."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
