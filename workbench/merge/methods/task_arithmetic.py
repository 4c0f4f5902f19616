"""Generalized task arithmetic: the engine behind task_arithmetic, TIES, DARE, Breadcrumbs, DELLA.

For each model the delta ``x_i - base`` is sparsified, multiplied by its weight, optionally
masked by sign consensus (TIES), summed, optionally divided by the summed weights, scaled by
``lambda`` and added back to the base.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch

from .base import MergeMethod, MergeParams, ParamSpec, register
from .common import resolve
from .sparsify import Sparsifier, sparsify

Consensus = Literal["sum", "count"]

DENSITY = ParamSpec(float, 1.0, 0.0, 1.0, per_model=True, help="fraction of each delta's entries kept")
GAMMA = ParamSpec(float, 0.01, 0.0, 1.0, per_model=True, help="fraction of largest-magnitude entries dropped")
EPSILON = ParamSpec(
    float, 0.15, 0.0, 1.0, per_model=True,
    help="spread of keep probabilities around density; needs 0 < density ± epsilon < 1 (so epsilon < 1)",
)


def consensus_mask(deltas: torch.Tensor, method: Consensus, dtype: torch.dtype) -> torch.Tensor:
    """True where a model's delta has the elected sign (TIES). The sign is elected per entry by
    the sum of the weighted deltas ('sum') or by a vote of their signs ('count'); ties go to +."""
    signs = deltas.sign().to(dtype)
    if method == "sum":
        votes = deltas.sum(dim=0)
    elif method == "count":
        votes = signs.sum(dim=0)
    else:
        raise ValueError(f"unknown consensus method {method!r}")
    elected = (votes >= 0).to(dtype) * 2 - 1
    return signs == elected


def generalized_task_arithmetic(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    params: MergeParams,
    *,
    name: str,
    specs: dict[str, ParamSpec],
    sparsifier: Sparsifier | None,
    consensus: Consensus | None,
) -> torch.Tensor:
    if base is None:
        raise ValueError(f"{name}: needs a base model")
    shared, per_model = resolve(name, params, specs, len(tensors))
    if not tensors:
        return base.clone()

    deltas = []
    for x, p in zip(tensors, per_model):
        delta = x - base
        if sparsifier is not None:
            delta = sparsify(
                delta, sparsifier, p["density"], rescale=shared["rescale"],
                gamma=p.get("gamma", 0.0), epsilon=p.get("epsilon", 0.0), generator=params.generator,
            )
        deltas.append(delta)
    deltas = torch.stack(deltas)
    weights = torch.tensor([p["weight"] for p in per_model], dtype=deltas.dtype, device=deltas.device)
    weights = weights.view(-1, *([1] * base.dim()))
    deltas = deltas * weights

    if consensus is not None:
        mask = consensus_mask(deltas, consensus, torch.int8 if shared["int8_mask"] else deltas.dtype)
        merged = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)  # per entry: weights of the models that agree
        divisor[divisor == 0] = 1
    else:
        merged = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1

    if shared["normalize"]:
        merged = merged / divisor
    if shared["lambda"] != 1:
        merged = merged * shared["lambda"]
    return (base + merged).to(base.dtype)


def gta_method(
    name: str,
    *,
    sparsifier: Sparsifier | None,
    consensus: Consensus | None,
    normalize: bool,
    rescale: bool,
    reference: str,
) -> MergeMethod:
    """A registered-ready task-arithmetic variant with mergekit's parameters and defaults."""
    specs = {
        "int8_mask": ParamSpec(bool, False, help="store the sign-consensus mask as int8 (same result)"),
        "normalize": ParamSpec(bool, normalize, help="divide the summed deltas by the summed weights"),
        "rescale": ParamSpec(bool, rescale, help="rescale sparsified deltas to their original L1 norm"),
        "lambda": ParamSpec(float, 1.0, help="scale of the merged delta"),
        "weight": ParamSpec(float, None, per_model=True, help="scale of this model's delta (may be negative)"),
        "density": DENSITY,
    }
    if sparsifier == "magnitude_outliers":
        specs["gamma"] = GAMMA
    if sparsifier == "della_magprune":
        specs["epsilon"] = EPSILON
    fn = partial(generalized_task_arithmetic, name=name, specs=specs, sparsifier=sparsifier, consensus=consensus)
    return MergeMethod(
        name=name, fn=fn, params=specs, base="required", min_models=1,
        random=sparsifier in ("random", "della_magprune"), reference=reference,
    )


register(gta_method(
    "task_arithmetic", sparsifier=None, consensus=None, normalize=False, rescale=False,
    reference="https://arxiv.org/abs/2212.04089",
))
