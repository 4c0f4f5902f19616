"""Per-unit metrics and their aggregation with standard errors (sample std / sqrt(n)).

Scores (the continuous fitness, always in [0, 1], higher is better):

- multiple_choice: the gold choice's probability under a softmax over the choices' summed
  log-likelihoods, averaged over items (``acc`` is its argmax counterpart).
- exact_match: the geometric-mean per-token probability of the first answer given the prompt,
  ``exp(loglikelihood / tokens)``, averaged over items.
- perplexity: ``exp(-nll) = 1 / ppl`` with ``nll`` the mean per-token negative log-likelihood.
- kl: ``exp(-kl)`` with ``kl`` the mean per-position KL divergence (see :mod:`workbench.eval.kl`).

For perplexity and kl the standard errors are over tokens (positions), treated as independent;
for ``ppl`` and ``score`` they come from the delta method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error ``std(ddof=1) / sqrt(n)`` (nan below two values)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    if x.size < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def gold_probability(lls: Sequence[float], gold: int) -> float:
    """Softmax over the choices' log-likelihoods, at the gold choice."""
    x = np.asarray(lls, dtype=np.float64)
    z = x - x.max()
    return float(np.exp(z[gold]) / np.exp(z).sum())


def multiple_choice_unit(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """acc (argmax ll), acc_norm (argmax ll / characters of the choice) and score for one item."""
    x = np.asarray(lls, dtype=np.float64)
    lens = np.asarray([max(len(c), 1) for c in choices], dtype=np.float64)
    return {"acc": float(np.argmax(x) == gold), "acc_norm": float(np.argmax(x / lens) == gold),
            "score": gold_probability(x, gold)}


def aggregate(units: Sequence[dict[str, float]], names: Sequence[str]) -> tuple[dict, dict]:
    """Mean and standard error of each named per-unit metric."""
    metrics, stderr = {}, {}
    for name in names:
        metrics[name], stderr[name] = mean_stderr([u[name] for u in units])
    return metrics, stderr


def token_mean_metrics(per_token: np.ndarray, name: str) -> tuple[dict, dict]:
    """Aggregate per-token nll (``name='nll'``, adds ppl) or kl values, with score = exp(-mean)."""
    m, se = mean_stderr(per_token)
    metrics = {name: m, "score": math.exp(-m)}
    stderr = {name: se, "score": metrics["score"] * se}
    if name == "nll":
        metrics["ppl"] = math.exp(m)
        stderr["ppl"] = metrics["ppl"] * se
    return metrics, stderr
