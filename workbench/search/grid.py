"""The honest baseline: a grid over the method's global parameters, at the evolutionary run's cost.

The question a user asks of a per-layer search is whether it beats a well-tuned global merge for
the same work. The grid answers it: every evolved parameter takes the values of its bounds in
steps of 0.1 (bounds rounded inward to the grid), one axis per source for per-model parameters
(``weight``, ``density``) and one for shared ones (``t``, ``lambda``); the grid is the Cartesian
product of the axes, the same value at every layer. It is scored on the search split, with the
search's own objective, for as many evaluations as the run made: when the grid has more points
than that, a seeded sample of them (the spec's seed). The held-out report scores its best point
beside the search's best.

Rows go to ``grid.jsonl`` as they are scored (whole rows, as ``history.jsonl``), so a report that
was killed part way scores only what is left when it runs again. The held-out report scores the
points on the search's workers (`workbench.search.report.score_grid`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from workbench.merge.methods import METHODS
from workbench.search.spec import SearchSpec

STEP = 0.1
GRID_FILE = "grid.jsonl"


def grid_axes(spec: SearchSpec, sources: list[str]) -> list[tuple[str, str | None, list[float]]]:
    """``(parameter, source or None, values)`` per axis, in the genome's order of parameters."""
    method = METHODS[spec.merge_method]
    axes = []
    for param, (low, high) in spec.evolve.items():
        values = [round(k * STEP, 6) for k in range(math.ceil(low / STEP - 1e-9), math.floor(high / STEP + 1e-9) + 1)]
        if not values:  # bounds narrower than a step: their middle
            values = [round((low + high) / 2, 6)]
        for model in (sources if method.params[param].per_model else [None]):
            axes.append((param, model, values))
    return axes


def grid_points(spec: SearchSpec, sources: list[str], n: int) -> tuple[list[dict], int]:
    """Up to ``n`` grid points as ``{(param, model): value}`` (all of them, in order, when the grid
    has at most ``n``; else a sample seeded by the spec), and the grid's size."""
    axes = grid_axes(spec, sources)
    sizes = [len(v) for _, _, v in axes]
    total = int(np.prod(sizes, dtype=object))
    if total <= n:
        picks = list(range(total))
    else:
        rng = np.random.default_rng(spec.seed)
        chosen: set[int] = set()
        picks = []
        while len(picks) < n:  # without replacement, for grids too large to enumerate
            k = int(rng.integers(total)) if total < 2**63 else int(rng.random() * total)
            if k not in chosen:
                chosen.add(k)
                picks.append(k)
    points = []
    for k in picks:
        point = {}
        for (param, model, values), size in zip(reversed(axes), reversed(sizes)):
            k, i = divmod(k, size)
            point[(param, model)] = values[i]
        points.append(point)
    return points, total


def global_layout(spec: SearchSpec, num_layers: int):
    """The genome of the spec's parameters with one value for every layer and part (a global merge)."""
    from dataclasses import replace

    from workbench.search.genome import GenomeLayout

    return GenomeLayout(replace(spec, granularity="global", split_attention_mlp=False), num_layers)


def point_genes(layout, point: dict) -> list[float]:
    """The genome of ``point`` in ``layout`` (every layer and part of a gene's parameter takes its value)."""
    return [round(float(layout.gene_of(g, point[(g.param, g.model)])), 8) for g in layout.genes]


def point_label(point: dict) -> dict:
    return {f"{param}[{Path(model).name}]" if model else param: v for (param, model), v in point.items()}


def read_grid(run_dir: Path) -> list[dict]:
    from workbench.search.run import read_jsonl_rows

    return read_jsonl_rows(Path(run_dir) / GRID_FILE)
