"""Sparsifiers for task vectors (deltas): which entries survive before they are merged.

Every function returns a tensor of the input's shape and dtype. With ``rescale`` the
survivors are scaled up so the L1 norm matches the input's (mergekit's ``RescaleNorm.l1``).
A density >= 1 returns the input unchanged (and unrescaled), as mergekit does.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]


def rescale_factor(mags: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7) -> torch.Tensor | None:
    """``|x|_1 / |x * mask|_1`` from ``mags = |x|``: the factor that gives the survivors the input's
    L1 norm; None when either norm is below ``eps`` (then nothing is rescaled).
    ``mags`` is scratch: it is overwritten with ``mags * mask``."""
    before = mags.sum()
    after = mags.mul_(mask).sum()
    if before < eps or after < eps:
        return None
    return before / after


def delta_rescale_factor(x: torch.Tensor, base: torch.Tensor, mask: torch.Tensor, eps: float = 1e-7,
                         chunk: int = 1 << 20) -> torch.Tensor | None:
    """:func:`rescale_factor` of ``|x - base|``, summed a chunk at a time (no full-size temporary)."""
    xs, bs, ms = x.reshape(-1), base.reshape(-1), mask.reshape(-1)
    before = after = 0.0
    for start in range(0, xs.numel(), chunk):
        part = slice(start, start + chunk)
        mags = (xs[part] - bs[part]).abs_()
        before += float(mags.sum())
        after += float(mags.mul_(ms[part]).sum())
    if before < eps or after < eps:
        return None
    return torch.tensor(before / after, dtype=x.dtype, device=x.device)


def apply_mask(x: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    """``x * mask``, optionally rescaled to the L1 norm of ``x`` (skipped when either norm < eps)."""
    out = x * mask
    factor = rescale_factor(x.abs(), mask, eps) if rescale else None  # x.abs() is a fresh copy
    return out if factor is None else out * factor


def magnitudes(x: torch.Tensor) -> torch.Tensor:
    """``|x|``, in float32 for half-precision tensors on CPU (as mergekit sorts them)."""
    w = x.abs()
    return w.float() if w.device.type == "cpu" and w.dtype in (torch.float16, torch.bfloat16) else w


SELECT_SAMPLE = 65_536  # entries sampled to bracket the k-th largest value of a big tensor


def kth_largest(w: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of the flat tensor ``w`` (1 <= k <= numel), exactly.

    A full sort costs O(n log n) and ``kthvalue`` copies the whole tensor; instead a fixed
    sample brackets the answer, and the exact selection runs on the few entries inside the
    bracket. If the bracket misses (it cannot be wrong, only too narrow) the full selection runs.
    """
    n = w.numel()
    if n <= 4 * SELECT_SAMPLE:
        return torch.kthvalue(w, n - k + 1).values
    g = torch.Generator().manual_seed(n)  # drawn on the CPU: the same sample on every device
    sample = w[torch.randint(n, (SELECT_SAMPLE,), generator=g).to(w.device)].float()
    q = 1 - k / n
    margin = 4 / SELECT_SAMPLE**0.5 + 1e-3  # ~8 standard errors of a sample quantile
    # sample order statistics around q (kthvalue is a selection; torch.quantile sorts the sample)
    m = SELECT_SAMPLE
    lo = torch.kthvalue(sample, 1 + int(max(q - margin, 0.0) * (m - 1))).values
    hi = torch.kthvalue(sample, 1 + math.ceil(min(q + margin, 1.0) * (m - 1))).values
    above = int(torch.count_nonzero(w > hi))
    if above < k <= int(torch.count_nonzero(w >= lo)):  # the answer lies in [lo, hi]
        if lo == hi:  # e.g. the zeros of a sparse delta
            return hi.to(w.dtype)
        band = w[(w >= lo) & (w <= hi)]
        return torch.kthvalue(band, band.numel() - (k - above) + 1).values
    return torch.kthvalue(w, n - k + 1).values


def top_k_mask(w: torch.Tensor, k: int, ascending: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of exactly the ``k`` largest entries of flat ``w``; among equal values at the
    threshold the lower indices win (a full sort's order among equals is arbitrary anyway).
    ``ascending``: ``w`` sorted ascending, when the caller keeps it; the threshold is then a lookup."""
    if k >= w.numel():
        return torch.ones_like(w, dtype=torch.bool)
    threshold = kth_largest(w, k) if ascending is None else ascending[w.numel() - k]
    mask = w >= threshold
    extra = int(torch.count_nonzero(mask)) - k   # entries tied at the threshold beyond k
    if extra > 0 and threshold != 0:  # entries equal to 0 stay 0 whether kept or not
        mask[(w == threshold).nonzero().flatten()[-extra:]] = False   # the lower indices stay
    return mask


# The *_mask functions take ``mags = magnitudes(x)`` and return a boolean keep-mask of its shape.

def magnitude_mask(mags: torch.Tensor, density: float, ascending: torch.Tensor | None = None) -> torch.Tensor:
    """The ``k = max(1, int(density * numel))`` largest-magnitude entries (TIES trim)."""
    if density <= 0 or mags.numel() == 0:
        return torch.zeros_like(mags, dtype=torch.bool)
    return top_k_mask(mags.reshape(-1), max(1, int(density * mags.numel())), ascending).view_as(mags)


def magnitude(x: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    if density >= 1:
        return x
    return apply_mask(x, magnitude_mask(magnitudes(x), density), rescale)


def magnitude_outliers_mask(mags: torch.Tensor, density: float, gamma: float,
                            ascending: torch.Tensor | None = None) -> torch.Tensor:
    """Model Breadcrumbs: drop the top ``int(gamma * n)`` magnitudes, then the smallest, keeping
    ``int(density * n)`` entries. When density + gamma > 1 fewer outliers are dropped."""
    n = mags.numel()
    n_keep = int(density * n)
    n_bottom = max(0, n - n_keep - int(gamma * n))
    w = mags.reshape(-1)
    # ascending ranks [n_bottom, n_bottom + n_keep): not among the n_bottom smallest, nor the largest rest
    keep = top_k_mask(w, n - n_bottom, ascending) if n_bottom else torch.ones_like(w, dtype=torch.bool)
    n_top = n - n_bottom - n_keep
    if n_top:
        keep &= ~top_k_mask(w, n_top, ascending)
    return keep.view_as(mags)


def magnitude_outliers(x: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    if density >= 1:
        return x
    return apply_mask(x, magnitude_outliers_mask(magnitudes(x), density, gamma), rescale)


# -- random masks: drawn on the CPU from (shape, probabilities, seed) alone, then copied to the
# tensor's device, so a seed gives the same mask on every device. --------------------------------

MASK_CHUNK = 1 << 20


def mask_seed(generator: torch.Generator | None) -> int:
    """One draw from ``generator`` (the global CPU generator when None) seeding a mask's bits; a
    CPU generator (what the merge executor passes) gives the same seed on every device."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(2**62, (1,), generator=generator, device=device))


def _threshold(p: np.ndarray | float) -> np.ndarray:
    """``p * 2**32`` rounded, as uint32: a 32-bit draw below it has probability p to within 2**-33."""
    return np.minimum(np.round(np.asarray(p, dtype=np.float64) * 2.0**32), 2**32 - 1).astype(np.uint32)


def draw_bernoulli(shape: tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    """A CPU bool tensor of ``shape``, each entry True independently with probability ``density``.

    Each entry takes 32 bits from numpy's PCG64 seeded with ``seed`` and is True when they are
    below ``density * 2**32``; about 5x faster than ``torch.rand`` (torch's CPU generator is a
    scalar Mersenne Twister)."""
    n = math.prod(shape)
    bits = np.random.PCG64(seed)
    threshold = _threshold(density)
    mask = np.empty(n, dtype=np.bool_)
    for start in range(0, n, MASK_CHUNK):
        k = min(MASK_CHUNK, n - start)
        draws = bits.random_raw((k + 1) // 2).view(np.uint32)[:k]   # two 32-bit draws per 64-bit output
        np.less(draws, threshold, out=mask[start:start + k])
    return torch.from_numpy(mask).view(shape)


def bernoulli_mask(x: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density`` (`draw_bernoulli`), on x's device."""
    return draw_bernoulli(tuple(x.shape), density, mask_seed(generator)).to(x.device)


def bernoulli(
    x: torch.Tensor, density: float, rescale: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    if density >= 1:
        return x
    return apply_mask(x, bernoulli_mask(x, density, generator), rescale)


def della_probabilities(n: int, density: float, epsilon: float) -> np.ndarray:
    """Keep probability by ascending magnitude rank 0..n-1 within a row: ``density - epsilon`` for the
    smallest, rising linearly to ``density + epsilon`` for the largest (float64). A row of one entry
    has no spread: it is kept with probability ``density`` (mergekit fails there)."""
    if n == 1:
        return np.array([density], dtype=np.float64)
    return (density - epsilon) + np.arange(n, dtype=np.float64) / (n - 1) * (2 * epsilon)


def draw_della(shape: tuple[int, ...], density: float, epsilon: float, seed: int) -> torch.Tensor:
    """A CPU bool tensor of ``shape`` (at least 2-d) in rank order: entry ``[i, r, ...]`` True
    independently with probability ``della_probabilities(shape[1], ...)[r]`` (32-bit PCG64 draws
    below ``p * 2**32``, as `draw_bernoulli`)."""
    outer, n = shape[0], shape[1]
    inner = math.prod(shape[2:])
    threshold = _threshold(della_probabilities(n, density, epsilon))[None, :, None]
    bits = np.random.PCG64(seed)
    mask = np.empty((outer, n, inner), dtype=np.bool_)
    step = max(1, MASK_CHUNK // max(1, n * inner))
    for start in range(0, outer, step):
        rows = min(step, outer - start)
        k = rows * n * inner
        draws = bits.random_raw((k + 1) // 2).view(np.uint32)[:k].reshape(rows, n, inner)
        np.less(draws, threshold, out=mask[start:start + rows])
    return torch.from_numpy(mask).view(shape)


def della_mask(mags: torch.Tensor, density: float, epsilon: float,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """DELLA MagPrune: keep entries at random with probabilities rising linearly with their
    magnitude rank along dim 1 (within each row of a matrix, across a vector), from
    ``density - epsilon`` for the smallest to ``density + epsilon`` for the largest.

    The draws are made in rank order on the CPU (`draw_della`) and scattered back to the entries by
    a stable sort on mags' device (ties ranked by position), so a seed gives the same mask anywhere."""
    if density <= 0:
        return torch.zeros_like(mags, dtype=torch.bool)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"della: epsilon={epsilon} with density={density} puts density ± epsilon outside (0, 1); "
            f"epsilon must be below min(density, 1 - density) = {min(density, 1 - density):g}"
        )
    rows = mags.reshape(1, -1) if mags.dim() < 2 else mags
    order = rows.argsort(dim=1, stable=True)  # order[i, r]: the entry of rank r in row i
    keep = draw_della(tuple(rows.shape), density, epsilon, mask_seed(generator)).to(mags.device)
    # scattering the rank-ordered draws inverts the permutation: no second sort (10x cheaper)
    return torch.empty_like(rows, dtype=torch.bool).scatter_(1, order, keep).reshape(mags.shape)


def della_magprune(x: torch.Tensor, density: float, epsilon: float, rescale: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    if density >= 1:
        return x
    return apply_mask(x, della_mask(magnitudes(x), density, epsilon, generator), rescale)


RANKED: tuple[Sparsifier, ...] = ("magnitude", "magnitude_outliers")  # thresholds from magnitude order


def keep_mask(mags: torch.Tensor, method: Sparsifier, density: float, gamma: float = 0.0, epsilon: float = 0.0,
              generator: torch.Generator | None = None, ascending: torch.Tensor | None = None) -> torch.Tensor | None:
    """Which entries of a delta survive ``method``, from its ``magnitudes``; None when all do.
    ``ascending``: the flat magnitudes sorted ascending, if the caller keeps them (``RANKED`` methods)."""
    if density >= 1:
        return None
    if method == "magnitude":
        return magnitude_mask(mags, density, ascending)
    if method == "random":
        return bernoulli_mask(mags, density, generator)
    if method == "magnitude_outliers":
        return magnitude_outliers_mask(mags, density, gamma, ascending)
    if method == "della_magprune":
        return della_mask(mags, density, epsilon, generator)
    raise ValueError(f"unknown sparsification method {method!r}")


def sparsify(
    x: torch.Tensor,
    method: Sparsifier,
    density: float,
    rescale: bool = False,
    gamma: float = 0.0,
    epsilon: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    mask = keep_mask(magnitudes(x), method, density, gamma, epsilon, generator)
    return x if mask is None else apply_mask(x, mask, rescale)
