"""A quality-vs-size scatter plot in text: total bits per weight (x) against KL (y, lower is better).

Front points are drawn as ``●``, the uniform configs (the reference a search must beat) as ``○``,
every other scored config as ``·``; axes carry their ranges. `render_scatter` is a plain function
(tested on its own); `FrontPlot` shows its lines.
"""

from __future__ import annotations

import math

from rich.text import Text
from textual.widgets import Static

MARKS = {"front": ("●", "bold green"), "uniform": ("○", "yellow"), "other": ("·", "dim")}
ORDER = ("other", "uniform", "front")  # later kinds are drawn over earlier ones


def render_scatter(points: list[tuple[float, float, str]], width: int = 60, height: int = 14,
                   x_label: str = "total bits per weight", y_label: str = "KL"
                   ) -> tuple[list[str], dict[tuple[int, int], str]]:
    """(lines, marks) of a scatter plot of (x, y, kind) points: a y axis on the left (y grows
    upwards), an x axis below, and {(line, column): kind} of every mark drawn. No point: one line."""
    finite = [(x, y, k) for x, y, k in points if math.isfinite(x) and math.isfinite(y)]
    if not finite:
        return ["no scored configurations yet"], {}
    xs, ys = [p[0] for p in finite], [p[1] for p in finite]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    label_w = max(len(f"{y1:.3g}"), len(f"{y0:.3g}"), len(y_label))
    grid = [[" "] * width for _ in range(height)]
    marks: dict[tuple[int, int], str] = {}
    for kind in ORDER:
        for x, y, k in finite:
            if k == kind:
                col = round((x - x0) / (x1 - x0) * (width - 1))
                row = height - 1 - round((y - y0) / (y1 - y0) * (height - 1))
                grid[row][col] = MARKS[kind][0]
                marks[row + 1, col + label_w + 2] = kind
    lines = [y_label.rjust(label_w) + " ^"]
    for r, row in enumerate(grid):
        tick = f"{y1:.3g}" if r == 0 else f"{y0:.3g}" if r == height - 1 else ""
        lines.append(tick.rjust(label_w) + " |" + "".join(row))
    lines.append(" " * label_w + " +" + "-" * width + ">")
    left, right = f"{x0:.3g}", f"{x1:.3g}"
    lines.append(" " * (label_w + 2) + left + x_label.center(max(0, width - len(left) - len(right))) + right)
    return lines, marks


def scatter_text(lines: list[str], marks: dict[tuple[int, int], str]) -> Text:
    """The lines as one rich Text, each mark in its kind's style."""
    out = Text()
    for i, line in enumerate(lines):
        start = len(out)
        out.append(line + ("\n" if i < len(lines) - 1 else ""))
        for (row, col), kind in marks.items():
            if row == i:
                out.stylize(MARKS[kind][1], start + col, start + col + 1)
    return out


class FrontPlot(Static):
    DEFAULT_CSS = """
    FrontPlot { height: auto; min-height: 8; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__("", **kwargs)
        self.points: list[tuple[float, float, str]] = []
        self.y_label = "search KL"

    def show(self, points: list[tuple[float, float, str]], y_label: str = "search KL") -> None:
        self.points, self.y_label = points, y_label
        width = max(30, (self.size.width or 80) - 12)
        legend = Text("  ● front   ○ uniform configs   · other scored configs", style="dim")
        text = scatter_text(*render_scatter(points, width=width, height=12, y_label=y_label))
        self.update(text + Text("\n") + legend)
