"""RAM (Reinforced Agent Merging): per entry, the mean of the deltas that are non-zero there
(|delta| > epsilon), so an entry changed by one model keeps that model's full change instead of
a share diluted by the models that left it alone. RAM+ (tensor-local) also scales each model's
unique entries up by 1 + r * min(alpha, shared/unique), from its counts in the tensor."""

from __future__ import annotations

import torch

from .base import MergeMethod, MergeParams, ParamSpec, register
from .common import resolve

EPSILON = ParamSpec(float, 1e-5, help="a delta entry counts as non-zero when its magnitude exceeds this")
RAM_PARAMS = {"epsilon": EPSILON}
RAMPLUS_PARAMS = {
    "r": ParamSpec(float, 0.1, help="gain on the unique entries: scale 1 + r * min(alpha, shared/unique)"),
    "alpha": ParamSpec(float, 0.2, help="cap of the shared/unique ratio in the gain"),
    "epsilon": EPSILON,
}


def _nonzero_deltas(base: torch.Tensor, tensors: list[torch.Tensor], eps: float):
    """Flat deltas with the zero entries zeroed, which entries are non-zero, and per entry how
    many models change it (at least 1)."""
    deltas = torch.stack([x - base for x in tensors]).view(len(tensors), -1)
    nonzero = deltas.abs() > eps
    counts = nonzero.sum(dim=0, keepdim=True)
    return deltas * nonzero, nonzero, counts


def ram(base: torch.Tensor | None, tensors: list[torch.Tensor], params: MergeParams) -> torch.Tensor:
    if base is None:
        raise ValueError("ram: needs a base model")
    shared, _ = resolve("ram", params, RAM_PARAMS, len(tensors))
    if not tensors:
        return base.clone()
    dz, _, counts = _nonzero_deltas(base, tensors, shared["epsilon"])
    return base + (dz / counts.clamp(min=1)).sum(dim=0).view_as(base)


def ramplus_tl(base: torch.Tensor | None, tensors: list[torch.Tensor], params: MergeParams) -> torch.Tensor:
    if base is None:
        raise ValueError("ramplus_tl: needs a base model")
    shared, _ = resolve("ramplus_tl", params, RAMPLUS_PARAMS, len(tensors))
    if not tensors:
        return base.clone()
    eps = shared["epsilon"]
    dz, nonzero, counts = _nonzero_deltas(base, tensors, eps)
    unique, overlap = counts == 1, counts > 1
    n_shared = (nonzero & overlap).sum(dim=1).to(dz.dtype)   # per model: its entries others change too
    n_unique = (nonzero & unique).sum(dim=1).to(dz.dtype)    # and those only it changes
    gain = 1 + shared["r"] * (n_shared / n_unique.clamp(min=eps)).clamp(0, shared["alpha"])
    merged = dz * (unique * gain.unsqueeze(-1)) + dz * overlap / counts.clamp(min=1)
    return base + merged.sum(dim=0).view_as(base)


REFERENCE = "https://arxiv.org/abs/2601.13572"
register(MergeMethod(name="ram", fn=ram, params=RAM_PARAMS, base="required", min_models=1, reference=REFERENCE))
register(MergeMethod(name="ramplus_tl", fn=ramplus_tl, params=RAMPLUS_PARAMS, base="required", min_models=1,
                     reference=REFERENCE))
