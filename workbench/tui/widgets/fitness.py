"""Best and mean fitness per generation, and every candidate's score, as one plot with axes and
labels (textual-plotext), under a line with the latest values."""

from __future__ import annotations

import math

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label
from textual_plotext import PlotextPlot


def _finite(x: float | None) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


class FitnessPlot(PlotextPlot):
    """The plot itself; ``series`` holds exactly what it draws: name -> (xs, ys)."""

    DEFAULT_CSS = """
    FitnessPlot { height: 14; width: 1fr; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.series: dict[str, tuple[list[float], list[float]]] = {}

    def draw(self, best: list[float], mean: list[float], scores: list[tuple[int, float]]) -> None:
        gens = list(range(len(best)))
        self.series = {"candidates": ([g for g, _ in scores], [s for _, s in scores]),
                       "best": (gens, list(best)), "mean": (gens, list(mean))}
        plt = self.plt
        plt.clear_figure()
        plt.title("fitness per generation")
        plt.xlabel("generation")
        plt.ylabel("fitness")
        xs, ys = self.series["candidates"]
        if xs:
            plt.scatter(xs, ys, marker="dot", color="gray", label="candidates")
        if gens:
            plt.plot(gens, best, marker="braille", color="green", label="best")
            plt.plot(gens, mean, marker="braille", color="cyan", label="mean")
        last = max([*gens, *xs], default=0)
        if gens or xs:
            plt.xlim(-0.2, max(1, last) + 0.2)
            plt.xticks(list(range(0, max(1, last) + 1, max(1, (last + 1) // 8))))
        self.refresh()


class FitnessChart(Vertical):
    DEFAULT_CSS = """
    FitnessChart { height: auto; }
    FitnessChart Label { color: $text-muted; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.best: list[float] = []
        self.mean: list[float] = []
        self.scores: list[tuple[int, float]] = []  # (generation, score) of every scored candidate

    def compose(self) -> ComposeResult:
        yield Label("best per generation: -", id="fit-best-label")
        yield Label("mean per generation: -", id="fit-mean-label")
        yield FitnessPlot(id="fit-plot")

    @property
    def plot(self) -> FitnessPlot:
        return self.query_one(FitnessPlot)

    def reset(self) -> None:
        self.best, self.mean, self.scores = [], [], []
        self._refresh()

    def add(self, best: float, mean: float) -> None:
        self.best.append(0.0 if math.isnan(best) else best)
        self.mean.append(0.0 if math.isnan(mean) else mean)
        self._refresh()

    def add_candidate(self, generation: int, score: float | None) -> None:
        if _finite(score):
            self.scores.append((generation, float(score)))
            self._refresh()

    def _refresh(self) -> None:
        def line(name, data):
            if not data:
                return f"{name} per generation: -"
            return f"{name} per generation: {data[-1]:.4f} (gen {len(data) - 1}; min {min(data):.4f}, max {max(data):.4f})"

        self.query_one("#fit-best-label", Label).update(line("best", self.best))
        self.query_one("#fit-mean-label", Label).update(line("mean", self.mean))
        self.plot.draw(self.best, self.mean, self.scores)
