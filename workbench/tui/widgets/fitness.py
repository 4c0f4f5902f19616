"""Best and mean fitness per generation as two sparklines with their latest values."""

from __future__ import annotations

import math

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Sparkline


class FitnessChart(Vertical):
    DEFAULT_CSS = """
    FitnessChart { height: auto; }
    FitnessChart Sparkline { height: 3; margin-bottom: 1; }
    FitnessChart #fit-best > .sparkline--max-color { color: $success; }
    FitnessChart Label { color: $text-muted; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.best: list[float] = []
        self.mean: list[float] = []

    def compose(self) -> ComposeResult:
        yield Label("best per generation: -", id="fit-best-label")
        yield Sparkline([], summary_function=max, id="fit-best")
        yield Label("mean per generation: -", id="fit-mean-label")
        yield Sparkline([], summary_function=max, id="fit-mean")

    def reset(self) -> None:
        self.best, self.mean = [], []
        self._refresh()

    def add(self, best: float, mean: float) -> None:
        self.best.append(0.0 if math.isnan(best) else best)
        self.mean.append(0.0 if math.isnan(mean) else mean)
        self._refresh()

    def _refresh(self) -> None:
        def line(name, data):
            if not data:
                return f"{name} per generation: -"
            return f"{name} per generation: {data[-1]:.4f} (gen {len(data) - 1}; min {min(data):.4f}, max {max(data):.4f})"

        self.query_one("#fit-best", Sparkline).data = list(self.best)
        self.query_one("#fit-mean", Sparkline).data = list(self.mean)
        self.query_one("#fit-best-label", Label).update(line("best", self.best))
        self.query_one("#fit-mean-label", Label).update(line("mean", self.mean))
