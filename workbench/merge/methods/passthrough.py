"""Passthrough: copy the single model's tensor, optionally multiplied by ``scale``."""

from __future__ import annotations

import torch

from .base import MergeMethod, MergeParams, ParamSpec, register
from .common import expect_models, resolve

PARAMS = {"scale": ParamSpec(float, 1.0, per_model=True, help="multiplier; 1 (or unset) copies the tensor")}


def passthrough(base: torch.Tensor | None, tensors: list[torch.Tensor], params: MergeParams) -> torch.Tensor:
    expect_models("passthrough", tensors, 1)
    _, per_model = resolve("passthrough", params, PARAMS, 1)
    scale = per_model[0]["scale"]
    return tensors[0] if scale == 1 else tensors[0] * scale


register(MergeMethod(name="passthrough", fn=passthrough, params=PARAMS, base="none", min_models=1, max_models=1))
