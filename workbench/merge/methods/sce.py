"""SCE: Select the entries whose deltas vary most across the models, Calculate per-model weights
from the mean square of each (selected) delta, Erase entries against the elected sign, average."""

from __future__ import annotations

import torch

from .base import MergeMethod, MergeParams, ParamSpec, register
from .common import resolve

PARAMS = {
    "select_topk": ParamSpec(float, 1.0, help="fraction of the entries whose deltas vary most across the "
                                              "models (among those that vary at all) kept; 1 keeps all, 0 none"),
    "int8_mask": ParamSpec(bool, False, help="store the masks as int8 (same result)"),
}


def variance_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """1.0 at the ``int(fraction * #nonzero)`` entries of largest variance over the models
    (dim 0, population variance), 0.0 elsewhere: one mask of a single delta's shape."""
    var = deltas.var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * fraction) if fraction > 0 else 0
    if k == 0:
        return torch.zeros_like(var)
    # torch.topk, as mergekit's sce_mask: among entries tied at the cutoff it keeps the ones mergekit
    # keeps (a threshold that keeps the lower indices differed in 2 entries of 3x SmolLM2's 272 tensors)
    mask = torch.zeros(var.numel(), dtype=var.dtype, device=var.device)
    mask[torch.topk(var.reshape(-1), k, largest=True).indices] = 1
    return mask.view_as(var)


def sce(base: torch.Tensor | None, tensors: list[torch.Tensor], params: MergeParams) -> torch.Tensor:
    if base is None:
        raise ValueError("sce: needs a base model")
    shared, _ = resolve("sce", params, PARAMS, len(tensors))
    if not tensors:
        return base.clone()
    n = len(tensors)
    deltas = torch.stack([x - base for x in tensors])
    if shared["select_topk"] < 1:
        deltas.mul_(variance_mask(deltas, shared["select_topk"]))
    # each model's weight: its share of the summed mean squares (equal shares when they are ~0)
    power = deltas.square().reshape(n, -1).mean(dim=1)
    total = float(power.sum())
    w = torch.full_like(power, 1 / n) if abs(total) < 1e-6 else power / total
    w = w.view(n, *([1] * base.dim()))
    sign = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1   # a tie elects +; a zero delta never agrees
    kept = w * (deltas.sign() == sign)
    merged = (deltas * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)
    return base + merged


register(MergeMethod(
    name="sce", fn=sce, params=PARAMS, base="required", min_models=1,
    reference="https://arxiv.org/abs/2408.07990",
))
