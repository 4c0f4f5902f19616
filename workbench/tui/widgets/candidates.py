"""The table of scored candidates: sortable by clicking a header or pressing `s` on a column."""

from __future__ import annotations

import math
import time

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable


class Cell:
    """A table cell that shows formatted text and sorts by its value (None sorts last)."""

    __slots__ = ("text", "value")

    def __init__(self, value, text: str | None = None) -> None:
        if isinstance(value, float) and math.isnan(value):
            value = None
        self.value = value
        if text is None:
            text = "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        self.text = text

    def __rich__(self) -> Text:
        return Text(self.text, justify="right" if isinstance(self.value, (int, float)) or self.value is None
                    else "left")

    def __repr__(self) -> str:
        return f"Cell({self.value!r})"


FIXED = (("generation", "gen"), ("index", "#"), ("kind", "kind"), ("score", "score"), ("seconds", "s"),
         ("merge_seconds", "merge s"))


class CandidateTable(DataTable):
    BINDINGS = [Binding("s", "sort_column", "Sort column", id="candidates.sort")]

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="cell", zebra_stripes=True, **kwargs)
        self.sort_key: str | None = None
        self.sort_reverse = False
        self.tasks: list[str] = []
        self.key_times: list[float] = []  # perf_counter when `s` was handled (key-press latency checks)

    def on_mount(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.clear(columns=True)
        self.tasks = []
        self.sort_key, self.sort_reverse = None, False
        for key, label in FIXED:
            self.add_column(label, key=key)

    def add_candidate(self, generation: int, index: int, kind: str, score, tasks: dict, seconds: float,
                      merge_seconds: float, error: str | None = None) -> None:
        for t in tasks:
            if t not in self.tasks:
                self.tasks.append(t)
                self.add_column(t, key=f"task:{t}", default=Cell(None))
        cells = {"generation": Cell(generation), "index": Cell(index),
                 "kind": Cell(kind if not error else f"{kind} (failed)"), "score": Cell(score),
                 "seconds": Cell(seconds, f"{seconds:.2f}"), "merge_seconds": Cell(merge_seconds, f"{merge_seconds:.2f}")}
        for t in self.tasks:
            cells[f"task:{t}"] = Cell((tasks.get(t) or {}).get("score"))
        self.add_row(*(cells[str(c.value)] for c in self.columns), key=f"{generation}:{index}")
        if self.sort_key is not None:
            self._apply_sort()

    def add_history_row(self, row: dict) -> None:
        self.add_candidate(row["generation"], row["index"], row["kind"], row["score"], row.get("tasks") or {},
                           row.get("seconds") or 0.0, row.get("merge_seconds") or 0.0, row.get("error"))

    def sort_by(self, key: str, reverse: bool | None = None) -> None:
        if reverse is None:  # the same column again flips the order; a new one starts high to low
            reverse = not self.sort_reverse if key == self.sort_key else key not in ("generation", "index")
        self.sort_key, self.sort_reverse = key, reverse
        self._apply_sort()

    def _apply_sort(self) -> None:
        reverse = self.sort_reverse

        def key(cell: Cell):
            missing = cell.value is None
            value = cell.value if not missing else 0
            return (not missing, value) if reverse else (missing, value)

        self.sort(self.sort_key, key=key, reverse=reverse)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        self.sort_by(str(event.column_key.value))

    def action_sort_column(self) -> None:
        self.key_times.append(time.perf_counter())
        if not self.columns:
            return
        column = list(self.columns)[self.cursor_column]
        self.sort_by(str(column.value))
