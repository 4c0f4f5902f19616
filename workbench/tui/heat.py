"""The incumbent's evolved parameters as a grid: one row per (parameter, model, part), one column
per layer group. Pure data, computed in the search worker from the genome layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class HeatRow:
    label: str
    values: list[float]
    low: float
    high: float


@dataclass
class HeatData:
    columns: list[str]
    rows: list[HeatRow]
    score: float | None = None


def group_labels(num_layers: int, group_size: int, num_groups: int) -> list[str]:
    if num_groups == 1:
        return ["all layers"]
    labels = []
    for g in range(num_groups):
        lo, hi = g * group_size, min((g + 1) * group_size, num_layers) - 1
        labels.append(f"L{lo}" if lo == hi else f"L{lo}-{hi}")
    return labels


def heat_data(layout, genome: list[float], score: float | None = None) -> HeatData:
    """Rows of evolved values of a genome laid out by ``layout`` (a ``search.genome.GenomeLayout``)."""
    cells: dict[tuple, dict[int, float]] = {}
    bounds: dict[tuple, tuple[float, float]] = {}
    for gene, x in zip(layout.genes, genome):
        key = (gene.param, gene.model, gene.part)
        cells.setdefault(key, {})[gene.group] = layout.value(gene, x)
        bounds[key] = layout.spec.evolve[gene.param]
    rows = []
    for (param, model, part), values in cells.items():
        label = param + (f" {Path(model).name}" if model else "") + ("" if part == "all" else f" {part}")
        low, high = bounds[(param, model, part)]
        rows.append(HeatRow(label, [values[g] for g in range(layout.num_groups)], low, high))
    return HeatData(group_labels(layout.num_layers, layout.group_size, layout.num_groups), rows, score)


def incumbent_heat(search) -> HeatData | None:
    inc = search.state.incumbent
    if inc is None:
        return None
    return heat_data(search.layout, inc["genome"], inc["score"])
