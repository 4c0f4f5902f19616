"""The held-out report as a bar chart: each model compared, one bar per held-out task (its score,
in [0, 1], higher is better, so tasks of every type share the axis)."""

from __future__ import annotations

from pathlib import Path

from textual_plotext import PlotextPlot


def short_name(name: str, width: int = 18) -> str:
    """A model's name as a bar label: a path's last part, cut to ``width``."""
    name = Path(name).name if "/" in name else name
    return name if len(name) <= width else name[: width - 1] + "…"


def task_score(metrics: dict) -> float | None:
    value = metrics.get("score")
    return float(value) if isinstance(value, (int, float)) else None


class ReportChart(PlotextPlot):
    """``models`` and ``series`` (task -> one score per model) hold exactly what it draws."""

    DEFAULT_CSS = """
    ReportChart { height: 1fr; width: 1fr; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.models: list[str] = []
        self.series: dict[str, list[float]] = {}

    def reset(self) -> None:
        self.models, self.series = [], {}
        self.draw()

    def add_row(self, row: dict) -> None:
        """One entry of the report (``heldout_report``'s row: name, search_score, heldout)."""
        self.models.append(row["name"])
        for task, metrics in row["heldout"].items():
            scores = self.series.setdefault(task, [0.0] * (len(self.models) - 1))
            score = task_score(metrics)
            scores.append(score if score is not None else 0.0)
        for scores in self.series.values():
            scores.extend([0.0] * (len(self.models) - len(scores)))
        self.draw()

    def draw(self) -> None:
        plt = self.plt
        plt.clear_figure()
        plt.title("held-out score by model (higher is better)")
        if self.models and self.series:
            labels = [short_name(m) for m in self.models]
            plt.multiple_bar(labels, list(self.series.values()), labels=list(self.series), orientation="horizontal",
                             width=0.3)
            plt.xlabel("score")
        self.refresh()
