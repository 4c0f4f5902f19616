"""Sparsifiers for task vectors (deltas): which entries survive before they are merged.

Every function returns a tensor of the input's shape and dtype. With ``rescale`` the
survivors are scaled up so the L1 norm matches the input's (mergekit's ``RescaleNorm.l1``).
A density >= 1 returns the input unchanged (and unrescaled), as mergekit does.
"""

from __future__ import annotations

from typing import Literal

import torch

Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]


def apply_mask(x: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """``x * mask``, optionally rescaled to the L1 norm of ``x`` (skipped when either norm < eps)."""
    out = x * mask
    if not rescale:
        return out
    before, after = x.abs().sum(), out.abs().sum()
    if before < eps or after < eps:
        return out
    return out * (before / after)


def _magnitudes(x: torch.Tensor) -> torch.Tensor:
    # flattened |x|; like mergekit, sorted in float32 on CPU (this only matters for ties).
    w = x.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


def _draw_dtype(x: torch.Tensor) -> torch.dtype:
    # torch.bernoulli lacks float16 on CPU; mergekit draws in float32 there, so do we.
    return x.dtype if x.device.type != "cpu" or x.dtype == torch.bfloat16 else torch.float32


def magnitude(x: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the ``k = max(1, int(density * numel))`` largest-magnitude entries (TIES trim)."""
    if density >= 1:
        return x
    if density <= 0 or x.numel() == 0:
        return torch.zeros_like(x)
    k = max(1, int(density * x.numel()))
    keep = torch.argsort(_magnitudes(x), descending=True)[:k]
    mask = torch.zeros(x.numel(), dtype=x.dtype, device=x.device)
    mask[keep] = 1
    return apply_mask(x, mask.view_as(x), rescale)


def magnitude_outliers(x: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs: drop the top ``int(gamma * n)`` magnitudes, then the smallest, keeping
    ``int(density * n)`` entries. When density + gamma > 1 fewer outliers are dropped."""
    if density >= 1:
        return x
    n = x.numel()
    n_keep = int(density * n)
    n_bottom = max(0, n - n_keep - int(gamma * n))
    ascending = torch.sort(_magnitudes(x), descending=False).indices
    mask = torch.zeros(n, dtype=x.dtype, device=x.device)
    mask[ascending[n_bottom : n_bottom + n_keep]] = 1
    return apply_mask(x, mask.view_as(x), rescale)


def bernoulli(
    x: torch.Tensor, density: float, rescale: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density``."""
    if density >= 1:
        return x
    p = torch.full(x.shape, density, dtype=_draw_dtype(x), device=x.device)
    mask = torch.bernoulli(p, generator=generator)
    return apply_mask(x, mask.to(x.dtype), rescale)


def della_magprune(
    x: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA MagPrune: keep entries at random with probabilities rising linearly with their
    magnitude rank along dim 1 (within each row of a matrix, across a vector), from
    ``density - epsilon`` for the smallest to ``density + epsilon`` for the largest."""
    if density >= 1:
        return x
    if density <= 0:
        return torch.zeros_like(x)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"della: epsilon={epsilon} with density={density} puts density ± epsilon outside (0, 1); "
            f"epsilon must be below min(density, 1 - density) = {min(density, 1 - density):g}"
        )
    rows = x.reshape(1, -1) if x.dim() < 2 else x
    n = rows.shape[1]
    # rank 0 = smallest magnitude in its row (argsort of argsort inverts the permutation)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(_draw_dtype(x))
    # A row of one entry has no spread: keep it with probability density (mergekit fails here).
    rank_norm = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    mask = torch.bernoulli(probs, generator=generator)
    return apply_mask(rows, mask.to(x.dtype), rescale).reshape(x.shape)


def sparsify(
    x: torch.Tensor,
    method: Sparsifier,
    density: float,
    rescale: bool = False,
    gamma: float = 0.0,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    if method == "magnitude":
        return magnitude(x, density, rescale)
    if method == "random":
        return bernoulli(x, density, rescale, generator)
    if method == "magnitude_outliers":
        return magnitude_outliers(x, density, gamma, rescale)
    if method == "della_magprune":
        return della_magprune(x, density, epsilon, rescale, generator)
    raise ValueError(f"unknown sparsification method {method!r}")
