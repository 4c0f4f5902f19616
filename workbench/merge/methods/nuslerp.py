"""NuSLERP: slerp between two models at t = w1 / (w0 + w1), per row, per column or over the
whole tensor; with a base, the two task vectors are interpolated and added to the base."""

from __future__ import annotations

import torch

from .base import MergeMethod, MergeParams, ParamSpec, register
from .common import expect_models, resolve

PARAMS = {
    "weight": ParamSpec(float, None, per_model=True, help="relative weight; t = w1 / (w0 + w1)"),
    "nuslerp_flatten": ParamSpec(bool, True, help="treat the whole tensor as one vector"),
    "nuslerp_row_wise": ParamSpec(bool, False, help="if not flattened: slerp along dim 0 (columns) "
                                                    "instead of the last dim (rows)"),
}


def nuslerp(
    t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = False, eps: float = 1e-8
) -> torch.Tensor:
    """Slerp of vectors along ``dim`` (or of the flattened tensors); colinear pairs are lerped."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp_merge(base: torch.Tensor | None, tensors: list[torch.Tensor], params: MergeParams) -> torch.Tensor:
    expect_models("nuslerp", tensors, 2)
    shared, per_model = resolve("nuslerp", params, PARAMS, len(tensors))
    w0, w1 = (float(p["weight"]) for p in per_model)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    dim = 0 if shared["nuslerp_row_wise"] else -1
    flatten = shared["nuslerp_flatten"]
    x0, x1 = tensors
    if base is None:
        return nuslerp(t, x0, x1, dim=dim, flatten=flatten)
    return base + nuslerp(t, x0 - base, x1 - base, dim=dim, flatten=flatten)


register(MergeMethod(
    name="nuslerp", fn=nuslerp_merge, params=PARAMS, base="optional", min_models=2, max_models=2,
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
))
