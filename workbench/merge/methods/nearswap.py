"""NearSwap: each entry of the base moves toward the other model by at most ``t``, so entries
where the two are within ``t`` of each other take the other model's value (t <= 0: the base)."""

from __future__ import annotations

import torch

from .base import MergeMethod, MergeParams, ParamSpec, register
from .common import expect_models, resolve

PARAMS = {"t": ParamSpec(float, None, help="largest step of an entry toward the other model; "
                                           "entries closer than t are swapped")}


def nearswap(base: torch.Tensor | None, tensors: list[torch.Tensor], params: MergeParams) -> torch.Tensor:
    if base is None:
        raise ValueError("nearswap: needs a base model")
    expect_models("nearswap", tensors, 1)
    shared, _ = resolve("nearswap", params, PARAMS, 1)
    other = tensors[0]
    share = (shared["t"] / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)   # t / |a - b|, at most 1
    return share * other + (1 - share) * base


register(MergeMethod(
    name="nearswap", fn=nearswap, params=PARAMS, base="required", min_models=1, max_models=1,
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
))
