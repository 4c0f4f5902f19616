"""Racing: stop a candidate early once it cannot plausibly beat the incumbent's score.

Units (items, or windows for perplexity/kl) are evaluated in chunks, in one fixed order shared by
every candidate (a seeded permutation, so each prefix is a random sample without replacement of
the split). After each chunk but the last, an upper confidence bound on the candidate's
*full-split* score is compared with the incumbent; below it, the candidate stops and its estimate
so far is returned with ``stopped_early``. With ``n`` of ``N`` units seen, mean ``m``, sample std
``s`` and ``d = (1 - confidence) / looks`` (Bonferroni over the checks):

- ``bound="normal"`` (default): ``m + t * s / sqrt(n) * sqrt((N - n) / (N - 1))``, Student-t
  quantile ``t`` at ``1 - d`` with ``n - 1`` degrees of freedom, finite-population corrected.
  Approximate, so it is applied only from the second chunk and 20 units on.
- ``bound="bernstein"`` (scores in [0, 1] only): the empirical Bernstein-Serfling bound for
  sampling without replacement (Bardenet & Maillard 2015, Thm. 3),
  ``m + sigma * sqrt(2 rho ln(5/d) / n) + kappa ln(5/d) / n``, ``kappa = 7/3 + 3/sqrt(2)``: valid
  for any [0, 1] values, but so conservative that it rarely stops anyone before ~100 units.

Both are also capped by what the unseen units could add at most (score 1 each). For perplexity
and kl the values are per-window mean losses (lower is better, weighted by tokens); the normal
bound gives a lower bound on the full-split loss, mapped through ``score = exp(-loss)``. So the
chance of stopping a candidate whose full-split score beats the incumbent is about
``1 - confidence`` at most (exactly so for the Bernstein bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

BOUNDS = ("normal", "bernstein")


def bernstein_serfling_upper(values: np.ndarray, total: int, delta: float) -> float:
    """Upper bound on the mean of a [0, 1] population of ``total`` from a sample without replacement."""
    n = values.size
    if n < 1:
        return 1.0
    rho = 1 - (n - 1) / total if n <= total / 2 else (1 - n / total) * (1 + 1 / n)
    log_term = math.log(5.0 / delta)
    kappa = 7 / 3 + 3 / math.sqrt(2)
    sigma = float(values.std(ddof=0))
    return float(values.mean() + sigma * math.sqrt(2 * rho * log_term / n) + kappa * log_term / n)


def t_quantile(p: float, dof: int) -> float:
    """Student-t quantile by the Cornish-Fisher expansion around the normal one (dof >= 1)."""
    z = NormalDist().inv_cdf(p)
    v = float(dof)
    return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3))


def normal_margin(values: np.ndarray, total: int, delta: float) -> float:
    """``t * s / sqrt(n) * sqrt((N - n) / (N - 1))``: the half-width for the population mean."""
    n = values.size
    fpc = math.sqrt(max(total - n, 0) / max(total - 1, 1))
    return t_quantile(1.0 - delta, n - 1) * float(values.std(ddof=1)) / math.sqrt(n) * fpc


def looks_for(total: int, chunk: int) -> int:
    """How many stop checks a race over ``total`` units in chunks of ``chunk`` makes."""
    return max(1, math.ceil(total / chunk) - 1)


@dataclass
class Race:
    """Accumulates unit values chunk by chunk and decides whether to stop.

    ``bounded``: values are per-unit scores in [0, 1]; else values are per-window mean losses
    (nll or kl) with ``weights`` (token counts), and the score is exp(-weighted mean).
    """

    total: int
    incumbent: float | None
    confidence: float = 0.95
    chunk: int = 50
    bounded: bool = True
    bound: str = "normal"
    values: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    total_weight: float | None = None
    stopped: bool = False

    def add(self, values, weights=None) -> None:
        self.values += list(values)
        self.weights += list(weights) if weights is not None else [1.0] * len(values)

    @property
    def delta(self) -> float:
        return (1.0 - self.confidence) / looks_for(self.total, self.chunk)

    def upper_bound(self) -> float:
        """Upper confidence bound on the full-split score given the units seen so far."""
        x = np.asarray(self.values, dtype=np.float64)
        n = x.size
        if n >= self.total:
            return self.estimate()
        if self.bound == "normal" and (n < 20 or n <= self.chunk):
            return 1.0 if self.bounded else math.exp(-self._seen_loss_floor())
        if self.bounded:
            most = (x.sum() + (self.total - n)) / self.total       # every unseen unit scores 1
            if self.bound == "bernstein":
                ub = bernstein_serfling_upper(x, self.total, self.delta)
            else:
                ub = float(x.mean()) + normal_margin(x, self.total, self.delta)
            return min(1.0, most, ub)
        w = np.asarray(self.weights, dtype=np.float64)
        loss = float((x * w).sum() / w.sum()) - normal_margin(x, self.total, self.delta)
        return math.exp(-max(loss, self._seen_loss_floor()))

    def _seen_loss_floor(self) -> float:
        """The full-split loss if every unseen token had zero loss."""
        x, w = np.asarray(self.values, dtype=np.float64), np.asarray(self.weights, dtype=np.float64)
        total_w = self.total_weight if self.total_weight is not None else w.mean() * self.total
        return float((x * w).sum() / total_w) if x.size else 0.0

    def estimate(self) -> float:
        x = np.asarray(self.values, dtype=np.float64)
        if self.bounded:
            return float(x.mean())
        w = np.asarray(self.weights, dtype=np.float64)
        return math.exp(-float((x * w).sum() / w.sum()))

    def should_stop(self) -> bool:
        """True (and remembered) when the bound falls below the incumbent before the split ends."""
        if self.incumbent is None or len(self.values) >= self.total:
            return False
        if self.upper_bound() < self.incumbent:
            self.stopped = True
        return self.stopped


def race_values(values, incumbent: float | None, chunk: int, confidence: float = 0.95,
                bound: str = "normal") -> Race:
    """Run a race over precomputed [0, 1] unit values (in order); for tests and simulations."""
    if bound not in BOUNDS:
        raise ValueError(f"bound: {bound!r} is not one of {', '.join(BOUNDS)}")
    race = Race(len(values), incumbent, confidence, chunk, bound=bound)
    for i in range(0, len(values), chunk):
        race.add(values[i:i + chunk])
        if race.should_stop():
            break
    return race


def race_order(n: int, seed: int = 0) -> list[int]:
    """The fixed, seeded order in which every candidate sees the units when racing."""
    return np.random.default_rng(seed).permutation(n).tolist()
