"""Typed messages posted by background workers (``post_message`` is thread-safe).

Workers never touch widgets: they call the library (the same functions as the CLI) and post
one of these to their screen, whose ``on_<name>`` handler updates the display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.message import Message

# --- search -----------------------------------------------------------------------------------

class SearchOpened(Message):
    """The search is set up (sources loaded); ``history`` holds rows of a resumed run."""

    def __init__(self, search: Any, run_dir: Path, resumed: bool, history: list[dict],
                 heat: Any | None) -> None:
        super().__init__()
        self.search = search
        self.run_dir = run_dir
        self.resumed = resumed
        self.history = history
        self.heat = heat


class CandidateScored(Message):
    """One candidate merged and scored (``event`` is a ``search.run.CandidateDone``)."""

    def __init__(self, event: Any) -> None:
        super().__init__()
        self.event = event


class GenerationScored(Message):
    """A generation ended (``event`` is a ``search.run.GenerationDone``); ``heat`` is the incumbent's
    :class:`workbench.tui.heat.HeatData`."""

    def __init__(self, event: Any, heat: Any | None) -> None:
        super().__init__()
        self.event = event
        self.heat = heat


class SearchEnded(Message):
    """The search loop returned (``reason``: the budget, "paused", "stopped", "cancelled")."""

    def __init__(self, run_dir: Path, reason: str, resumable: bool, report_follows: bool) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.reason = reason
        self.resumable = resumable
        self.report_follows = report_follows


class ReportEntryScored(Message):
    """One entry of the held-out report was scored."""

    def __init__(self, row: dict) -> None:
        super().__init__()
        self.row = row


class ReportReady(Message):
    def __init__(self, report: dict) -> None:
        super().__init__()
        self.report = report


# --- generic background jobs (merges, model preparation, listings) ----------------------------

class JobProgress(Message):
    """Progress of a job: ``done`` of ``total`` (``total`` None: unknown), with a line of text."""

    def __init__(self, job: str, done: int | None, total: int | None, text: str = "") -> None:
        super().__init__()
        self.job = job
        self.done = done
        self.total = total
        self.text = text


class JobFinished(Message):
    def __init__(self, job: str, result: Any = None, text: str = "") -> None:
        super().__init__()
        self.job = job
        self.result = result
        self.text = text


class JobFailed(Message):
    """A job failed; ``error`` is the one-line message (file:line: field: message for recipes)."""

    def __init__(self, job: str, error: str) -> None:
        super().__init__()
        self.job = job
        self.error = error


class RunsLoaded(Message):
    def __init__(self, root: Path, runs: list) -> None:  # list[workbench.tui.runs.RunSummary]
        super().__init__()
        self.root = root
        self.runs = runs


class ModelsLoaded(Message):
    def __init__(self, models: list[dict], zoo: list[dict]) -> None:
        super().__init__()
        self.models = models
        self.zoo = zoo
