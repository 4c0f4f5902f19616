"""Progress events drawn by rich: a bar per stage on a terminal; headless (a pipe, a log), a plain
line when a stage starts, at most every 30 s while it runs, and when it ends; nothing with
``--no-progress`` (unless the command logs lines then, as `zoo build` does)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from workbench.progress import Progress as Event
from workbench.progress import ProgressFn

LINE_EVERY_S = 30.0


@contextmanager
def progress_bars(console: Console, enabled: bool = True, transient: bool = False,
                  lines_when_disabled: bool = False) -> Iterator[ProgressFn]:
    """A ProgressFn for an action; live bars only when ``enabled`` and ``console`` is a terminal."""
    if not enabled and not lines_when_disabled:
        yield lambda ev: None
        return
    if not (enabled and console.is_terminal):
        yield _line_logger(console)
        return
    bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=transient)
    tasks: dict[str, int] = {}

    def show(ev: Event) -> None:
        if ev.stage not in tasks:
            tasks[ev.stage] = bars.add_task(ev.stage, total=ev.total, info="")
        fields = {"info": ev.text[:60]} if ev.text else {}
        if ev.total is not None:
            fields["total"] = ev.total
        if ev.done is not None:
            fields["completed"] = ev.done
        bars.update(tasks[ev.stage], **fields)

    with bars:
        yield show


def _line_logger(console: Console) -> ProgressFn:
    last: dict[str, float] = {}

    def log(ev: Event) -> None:
        now = time.monotonic()
        first = ev.stage not in last
        done = ev.total is not None and ev.done == ev.total
        if not (first or done or now - last[ev.stage] >= LINE_EVERY_S):
            return
        last[ev.stage] = now
        count = "" if ev.done is None else f" {ev.done}/{ev.total}" if ev.total is not None else f" {ev.done}"
        console.print(f"{ev.stage}:{count}" + (f" {ev.text}" if ev.text else ""), highlight=False, soft_wrap=True,
                      markup=False)

    return log
