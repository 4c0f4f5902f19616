"""Typed messages posted by background workers (``post_message`` is thread-safe).

Workers never touch widgets: they call the library (the same functions as the CLI) and post
one of these to their screen, whose ``on_<name>`` handler updates the display.
"""

from __future__ import annotations

from dataclasses import dataclass
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


# --- generic background jobs (WorkbenchScreen.run_job: merges, quantization, exports, the zoo) ----

@dataclass(eq=False)  # Message.__post_init__ sets up the message; identity hash
class JobProgress(Message):
    """Progress of a job: ``done`` of ``total`` (``total`` None: unknown), with a line of text. A
    newer one replaces one of the same job still queued: a fast job does not flood the screen."""

    job: str
    done: int | None
    total: int | None
    text: str = ""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, JobProgress) and message.job == self.job


@dataclass(eq=False)  # Message.__post_init__ sets up the message; identity hash
class JobFinished(Message):
    job: str
    result: Any = None
    text: str = ""


@dataclass(eq=False)  # Message.__post_init__ sets up the message; identity hash
class JobFailed(Message):
    """A job failed; ``error`` is the one-line message (file:line: field: message for recipes)."""

    job: str
    error: str


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


@dataclass(eq=False)  # Message.__post_init__ sets up the message; identity hash
class ModelsKnown(Message):
    """The model references a search builder offers: home model names, then paths."""

    models: list[str]


@dataclass(eq=False)
class LmEvalChecked(Message):
    """A builder's lm-eval task checked off the UI thread: why it does not load (None: it loads)."""

    key: tuple[str, str]   # (lm_eval:NAME, the spec's lm_eval options as JSON)
    problem: str | None
