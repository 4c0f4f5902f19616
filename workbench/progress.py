"""The one progress event every action reports, and the callback type that receives it.

An action calls ``progress(Progress(stage, done, total, text))`` as it goes; the CLI draws a rich bar
per stage (``workbench.cli.progress``), the UI posts a ``JobProgress`` message (``workbench.tui.jobs``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units of ``stage`` (``total`` None: unknown length), a line of ``text``,
    and the training loss where there is one."""

    stage: str
    done: int | None = None
    total: int | None = None
    text: str = ""
    loss: float | None = None


ProgressFn = Callable[[Progress], None]


def emit(progress: ProgressFn | None, stage: str, done: int | None = None, total: int | None = None,
         text: str = "", loss: float | None = None) -> None:
    """Report to ``progress`` if there is one (every action's callback is optional)."""
    if progress:
        progress(Progress(stage, done, total, text, loss))
