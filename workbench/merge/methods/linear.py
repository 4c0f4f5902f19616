"""Linear: a weighted sum of the models, divided by the summed weights when ``normalize``."""

from __future__ import annotations

import torch

from .base import MergeMethod, MergeParams, ParamSpec, register
from .common import resolve, work_dtype

PARAMS = {
    "weight": ParamSpec(float, None, per_model=True, help="this model's coefficient (may be negative)"),
    "normalize": ParamSpec(bool, True, help="divide by the sum of the weights"),
}


def linear(base: torch.Tensor | None, tensors: list[torch.Tensor], params: MergeParams) -> torch.Tensor:
    shared, per_model = resolve("linear", params, PARAMS, len(tensors))
    if not tensors:
        raise ValueError("linear: needs at least one model")
    dtype = work_dtype(tensors[0])
    weights = [float(p["weight"]) for p in per_model]
    out = tensors[0].to(dtype) * weights[0]   # = 0 + w0 * x0, one pass fewer than zeros + add
    for x, w in zip(tensors[1:], weights[1:]):
        out.add_(x.to(dtype), alpha=w)
    if shared["normalize"]:
        total = sum(weights)
        if total == 0:  # mergekit would return inf/nan here
            raise ValueError(f"linear: weights {weights} sum to 0; with normalize: true they must not")
        out /= total
    return out.to(tensors[0].dtype)


register(MergeMethod(
    name="linear", fn=linear, params=PARAMS, base="none", min_models=1,
    reference="https://arxiv.org/abs/2203.05482",
))
