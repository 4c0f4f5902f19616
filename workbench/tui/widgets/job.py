"""A progress bar with a line of status text, for one background job (merge, preparation)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, ProgressBar


class JobStatus(Vertical):
    DEFAULT_CSS = """
    JobStatus { height: auto; }
    JobStatus ProgressBar { width: 1fr; }
    JobStatus Label { width: 1fr; color: $text-muted; }
    JobStatus.-idle ProgressBar { display: none; }
    """

    def __init__(self, idle: str = "idle", **kwargs) -> None:
        super().__init__(**kwargs)
        self.idle = idle
        self.add_class("-idle")

    def compose(self) -> ComposeResult:
        yield ProgressBar(total=None, show_eta=True)
        yield Label(Text(self.idle))

    @property
    def bar(self) -> ProgressBar:
        return self.query_one(ProgressBar)

    @property
    def label(self) -> Label:
        return self.query_one(Label)

    def start(self, text: str, total: int | None = None) -> None:
        self.remove_class("-idle")
        self.bar.update(total=total, progress=0)
        self.label.update(Text(text))

    def progress(self, done: int | None, total: int | None, text: str = "") -> None:
        """``total`` None keeps the bar as it is; ``done`` and ``total`` both None: a new step of
        unknown length (the bar pulses)."""
        if total is not None:
            self.bar.update(total=total, progress=done or 0)
        elif done is None:
            self.bar.update(total=None, progress=0)
        if text:
            self.label.update(Text(text))

    def finish(self, text: str) -> None:
        total = self.bar.total
        self.bar.update(total=total or 1, progress=total or 1)
        self.label.update(Text(text))

    def fail(self, text: str) -> None:
        self.bar.update(total=1, progress=0)
        self.label.update(Text.assemble(("failed: ", "red"), text))
