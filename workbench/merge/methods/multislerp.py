"""Multi-SLERP: a weighted mean of N tensors on the hypersphere (optionally of their deltas from
a base): directions averaged in the tangent space at their weighted mean direction, mapped back
by the exponential map, and scaled to the weighted mean norm."""

from __future__ import annotations

import torch

from .base import MergeMethod, MergeParams, ParamSpec, register
from .common import resolve

PARAMS = {
    "weight": ParamSpec(float, None, per_model=True, help="this model's share of the mean"),
    "normalize_weights": ParamSpec(bool, True, help="divide the weights by their sum"),
    "eps": ParamSpec(float, 1e-8, help="added to norms before dividing by them"),
}


def multislerp(base: torch.Tensor | None, tensors: list[torch.Tensor], params: MergeParams) -> torch.Tensor:
    shared, per_model = resolve("multislerp", params, PARAMS, len(tensors))
    if not tensors:
        raise ValueError("multislerp: needs at least one model")
    if len(tensors) == 1:
        return tensors[0]   # one model is its own mean (with or without a base)
    eps = shared["eps"]
    weights = [float(p["weight"]) for p in per_model]
    x = torch.stack(tensors)
    if base is not None:
        x -= base
    flat = x.view(len(tensors), -1)
    w = torch.tensor(weights, dtype=x.dtype, device=x.device)
    if shared["normalize_weights"]:
        if sum(weights) == 0:
            raise ValueError(f"multislerp: weights {weights} sum to 0; with normalize_weights: true they must not")
        w = w / w.sum()
    w_col = w.view(-1, 1)
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w_col).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:   # the weighted directions cancel: no mean direction
        if len(tensors) != 2:
            raise ValueError("multislerp: the weighted directions of the models sum to zero (antipodal "
                             "tensors with balancing weights); change the weights")
        out = (x[0] * w[0] + x[1] * w[1])   # two models: linear interpolation
        return out if base is None else out + base
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean   # projections onto the tangent space
    step = (tangents * w_col).sum(0)
    length = torch.norm(step) + eps
    out = mean * torch.cos(length) + step * (torch.sin(length) / length)   # exponential map at `mean`
    out = (out * (norms.squeeze(-1) * w).sum()).view(x.shape[1:])
    return out if base is None else out + base


register(MergeMethod(
    name="multislerp", fn=multislerp, params=PARAMS, base="optional", min_models=1,
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
))
