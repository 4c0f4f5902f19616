"""The contract every merge method follows, and the registry that names them.

A merge method is a pure function ``(base, tensors, params) -> tensor``:

- ``base``: the base model's tensor, or ``None`` when the method takes no base;
- ``tensors``: the other models' tensors, in recipe order (the base is never among them);
- ``params``: a :class:`MergeParams` with the shared values (``normalize``, ``t``, ...),
  one dict per entry of ``tensors`` (``weight``, ``density``, ...) and a seeded
  ``torch.Generator`` for the methods that draw random masks.

Every input arrives as float32 (float64 stays float64); the executor casts the result.
Parameter names, defaults and ranges follow mergekit so that its recipes mean the same here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

BasePolicy = Literal["required", "optional", "none"]


@dataclass(frozen=True)
class ParamSpec:
    """One recipe parameter: its type, default (``None`` = required) and allowed range."""

    kind: type  # float, bool or int
    default: Any = None
    low: float | None = None  # inclusive bounds, checked when the recipe is validated
    high: float | None = None
    per_model: bool = False  # True: set per source model (weight, density); False: shared
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass
class MergeParams:
    """Resolved parameter values for one output tensor."""

    shared: dict[str, Any] = field(default_factory=dict)
    per_model: list[dict[str, Any]] = field(default_factory=list)
    generator: torch.Generator | None = None
    # per model: |x - base| flattened and sorted ascending, from a caller that keeps them across
    # merges (the in-memory search); magnitude thresholds are then a lookup, not a selection
    sorted_magnitudes: list[torch.Tensor] | None = None

    def model_values(self, name: str) -> list[Any]:
        return [p[name] for p in self.per_model]


MergeFn = Callable[[torch.Tensor | None, list[torch.Tensor], MergeParams], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    params: dict[str, ParamSpec]
    base: BasePolicy
    min_models: int = 1  # counts the non-base models
    max_models: int | None = None
    random: bool = False  # draws from params.generator
    ranks_magnitudes: bool = False  # thresholds delta magnitudes: can use params.sorted_magnitudes
    reference: str = ""

    def shared_params(self) -> dict[str, ParamSpec]:
        return {k: v for k, v in self.params.items() if not v.per_model}

    def model_params(self) -> dict[str, ParamSpec]:
        return {k: v for k, v in self.params.items() if v.per_model}


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise KeyError(f"unknown merge method {name!r}; known methods: {known}") from None
