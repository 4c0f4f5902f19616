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
from .sparsify import RANKED, Sparsifier, delta_rescale_factor, keep_mask, rescale_factor

Consensus = Literal["sum", "count"]

DENSITY = ParamSpec(float, 1.0, 0.0, 1.0, per_model=True, help="fraction of each delta's entries kept")
GAMMA = ParamSpec(float, 0.01, 0.0, 1.0, per_model=True, help="fraction of largest-magnitude entries dropped")
EPSILON = ParamSpec(
    float, 0.15, 0.0, 1.0, per_model=True,
    help="spread of keep probabilities around density; needs 0 < density ± epsilon < 1 (so epsilon < 1)",
)


# Masks here are float 0/1 tensors, not bools: on CPU, comparisons that make bools and float
# ops that take them run 3-5x slower than plain float ops (mixed dtypes leave the vector path).

def elected_sign(weighted: list[torch.Tensor], method: Consensus) -> torch.Tensor:
    """TIES sign election per entry, as +1/-1: the sign of the sum of the weighted deltas ('sum')
    or of a vote of their signs ('count'); ties go to +. (A sum is -0.0 only when every delta
    is zero there, and then no delta agrees with either sign.)"""
    if method == "sum":
        votes = torch.stack(weighted).sum(dim=0) if len(weighted) > 2 else sum(weighted)
    elif method == "count":
        votes = sum(d.sign() for d in weighted)
    else:
        raise ValueError(f"unknown consensus method {method!r}")
    return torch.copysign(torch.ones_like(votes), votes)


def agrees(delta: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """1.0 where sign(delta) is the elected ``sign`` (+1/-1), else 0.0; a zero entry never agrees."""
    return (delta * sign).sign_().clamp_(min=0)


CHUNK = 1 << 19  # entries combined at a time: temporaries stay small and in cache


def combine(weighted: list[torch.Tensor], weights: list[float], consensus: Consensus | None,
            normalize: bool) -> torch.Tensor:
    """Sum weighted deltas (only those agreeing with the elected sign, under consensus) and
    divide by the summed weights of what was added when ``normalize``."""
    if consensus is not None:
        sign = elected_sign(weighted, consensus)
        merged = torch.zeros_like(weighted[0])
        divisor = torch.zeros_like(weighted[0])
        for d, w in zip(weighted, weights):
            agree = agrees(d, sign)
            merged.addcmul_(d, agree)
            divisor.add_(agree, alpha=w)
        divisor.add_(divisor.abs().sign_().neg_().add_(1))   # 0 -> 1 (nothing agreed: merged is 0 there)
    else:
        merged = weighted[0]   # the weighted deltas are scratch: summed in place, no stacked copy
        for d in weighted[1:]:
            merged.add_(d)
        divisor = torch.tensor(weights, dtype=merged.dtype, device=merged.device).sum()
        if divisor.abs() < 1e-8:
            divisor = torch.ones_like(divisor)
    return merged.div_(divisor) if normalize else merged


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
    weights = [float(p["weight"]) for p in per_model]

    # 1. per model: which delta entries survive sparsification, and the L1 rescale factor
    masks, factors = [], []
    for i, (x, p) in enumerate(zip(tensors, per_model)):
        mask = factor = None
        if sparsifier == "random":  # DARE's mask needs no magnitudes: no full-size temporary
            mask = keep_mask(x, sparsifier, p["density"], generator=params.generator)
            if mask is not None and shared["rescale"]:
                factor = delta_rescale_factor(x, base, mask)
        elif sparsifier is not None:
            mags = (x - base).abs_()  # inputs are float32/float64, so no cast is needed
            ascending = params.sorted_magnitudes[i] if params.sorted_magnitudes else None
            mask = keep_mask(mags, sparsifier, p["density"], p.get("gamma", 0.0), p.get("epsilon", 0.0),
                             params.generator, ascending)
            if mask is not None and shared["rescale"]:
                factor = rescale_factor(mags, mask)
            del mags
        masks.append(None if mask is None else mask.reshape(-1))
        factors.append(factor)

    # 2. chunk by chunk: masked, rescaled, weighted deltas -> combined -> added to the base
    out = torch.empty_like(base)
    b, o, xs = base.reshape(-1), out.view(-1), [x.reshape(-1) for x in tensors]
    for start in range(0, b.numel(), CHUNK):
        part = slice(start, start + CHUNK)
        weighted = []
        for x, mask, factor, w in zip(xs, masks, factors, weights):
            d = x[part] - b[part]
            if mask is not None:
                d.mul_(mask[part])
            if factor is not None:
                d.mul_(factor)
            weighted.append(d.mul_(w))
        merged = combine(weighted, weights, consensus, shared["normalize"])
        if shared["lambda"] != 1:
            merged.mul_(shared["lambda"])
        torch.add(b[part], merged, out=o[part])
    return out


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
        random=sparsifier in ("random", "della_magprune"), ranks_magnitudes=sparsifier in RANKED,
        reference=reference,
    )


register(gta_method(
    "task_arithmetic", sparsifier=None, consensus=None, normalize=False, rescale=False,
    reference="https://arxiv.org/abs/2212.04089",
))
