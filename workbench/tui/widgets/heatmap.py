"""The incumbent's per-layer weights and densities as coloured cells (rich Text in a Static): a row
per evolved parameter (and model, and part) labelled at its left with its bounds at its right, a
column per layer group labelled on top, and a colour legend below."""

from __future__ import annotations

from itertools import pairwise

from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual.widgets import Static

from workbench.tui.heat import HeatData

# viridis-like stops: low values dark blue, high values yellow
STOPS = [(0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)), (0.75, (94, 201, 98)),
         (1.0, (253, 231, 37))]


def colour(t: float) -> tuple[int, int, int]:
    t = min(1.0, max(0.0, t))
    for (t0, c0), (t1, c1) in pairwise(STOPS):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            return tuple(round(a + f * (b - a)) for a, b in zip(c0, c1))  # type: ignore[return-value]
    return STOPS[-1][1]


def render_heat(data: HeatData | None, label_width: int = 24, cell: int = 5) -> Text:
    """Rows labelled at the left (as wide as the longest label, up to ``label_width`` + 8), a column
    per layer group as wide as its label (at least ``cell``), each cell coloured within its row's bounds."""
    if data is None or not data.rows:
        return Text("heat map of the incumbent:\nafter the first generation", style="dim")
    text = Text()
    head = "incumbent" + (f" (score {data.score:.4f})" if data.score is not None else "")
    label_width = min(label_width + 8, max(label_width, *(len(r.label) + 1 for r in data.rows)))
    width = max(cell * 2 if len(data.columns) == 1 else cell, *(len(c) + 1 for c in data.columns))
    text.append(head[:label_width].ljust(label_width), style="bold")
    for col in data.columns:
        text.append(col.rjust(width - 1) + " ", style="bold")
    text.append("\n")
    for row in data.rows:
        text.append(row.label[:label_width - 1].ljust(label_width))
        for v in row.values:
            t = (v - row.low) / (row.high - row.low) if row.high > row.low else 0.5
            r, g, b = colour(t)
            fg = "black" if (0.299 * r + 0.587 * g + 0.114 * b) > 140 else "white"
            text.append(f"{v:.2f}".rjust(width - 1) + " ", style=Style(color=fg, bgcolor=Color.from_rgb(r, g, b)))
        text.append(f" [{row.low:g}, {row.high:g}]", style="dim")
        text.append("\n")
    text.append("low ", style="dim")
    for i in range(10):
        r, g, b = colour(i / 9)
        text.append("  ", style=Style(bgcolor=Color.from_rgb(r, g, b)))
    text.append(" high (of each row's evolve bounds, at its right)", style="dim")
    text.append("\nrows: evolved parameter, source model, part; columns: layer groups", style="dim")
    return text


class HeatMap(Static):
    DEFAULT_CSS = """
    HeatMap { width: auto; height: auto; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(render_heat(None), **kwargs)
        self.data: HeatData | None = None

    def show(self, data: HeatData | None) -> None:
        self.data = data
        self.update(render_heat(data))
