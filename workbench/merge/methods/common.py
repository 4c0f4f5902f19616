"""Small helpers shared by the method modules: parameter defaults and checks."""

from __future__ import annotations

from typing import Any

import torch

from .base import MergeParams, ParamSpec


def resolve(
    method: str, params: MergeParams, specs: dict[str, ParamSpec], n_models: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Shared and per-model values with unset optional parameters filled from their defaults."""
    if len(params.per_model) != n_models:
        raise ValueError(f"{method}: got {len(params.per_model)} per-model parameter sets for {n_models} models")

    def fill(given: dict[str, Any], per_model: bool) -> dict[str, Any]:
        out = dict(given)
        for name, spec in specs.items():
            if spec.per_model != per_model or out.get(name) is not None:
                continue
            if spec.required:
                raise ValueError(f"{method}: missing required parameter {name!r}")
            out[name] = spec.default
        return out

    return fill(params.shared, False), [fill(p, True) for p in params.per_model]


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def expect_models(method: str, tensors: list[torch.Tensor], count: int) -> None:
    if len(tensors) != count:
        raise ValueError(f"{method}: needs exactly {count} non-base model(s), got {len(tensors)}")
