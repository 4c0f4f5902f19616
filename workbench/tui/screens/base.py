"""What every screen shares: the tab bar on top, the footer, access to the config."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual.screen import Screen

from workbench.progress import Progress, ProgressFn

if TYPE_CHECKING:
    from workbench.tui.app import WorkbenchApp
    from workbench.tui.config import TuiConfig


class JobCancelled(Exception):
    """Raised in a job's thread by its progress callback once the worker is cancelled."""


class WorkbenchScreen(Screen):
    """A screen with the tab bar, the footer, the config, and one way to run background jobs:
    :meth:`run_job` calls an action of :mod:`workbench.ops` in a thread worker, shows its progress
    in a :class:`JobStatus`, disables its buttons while it runs, and reports the end as a
    notification; a screen reacts to the end in :meth:`job_finished` / :meth:`job_failed`."""

    MODE = ""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.jobs: dict[str, tuple[str | None, tuple[str, ...]]] = {}   # running: job -> (status, buttons)

    @property
    def wb(self) -> WorkbenchApp:
        return self.app  # type: ignore[return-value]

    @property
    def config(self) -> TuiConfig:
        return self.wb.config

    def error(self, message: str, title: str = "error") -> None:
        self.wb.error(message, title=title)

    def info(self, message: str, title: str = "") -> None:
        self.notify(message, title=title, markup=False)

    def warn(self, message: str, title: str = "") -> None:
        self.notify(message, title=title, severity="warning", markup=False)

    def start_if_outputs_free(self, outputs: Iterable[Path | None], overwrite: bool,
                              start: Callable[[], None]) -> None:
        """Run ``start`` when no output would replace something; an occupied output is an error
        unless overwrite is ticked, and then the user confirms first (nothing is replaced unasked)."""
        from workbench.atomic import occupied
        from workbench.tui.screens.confirm import ConfirmScreen

        taken = [p for p in outputs if p is not None and occupied(p)]
        if not taken:
            start()
        elif not overwrite:
            self.error(f"{taken[0]} already exists and is not empty; choose another output or tick overwrite")
        else:
            names = "\n".join(f"  {p}" for p in taken)
            self.app.push_screen(ConfirmScreen(f"Replace what is there now? Everything in it is deleted:\n{names}"),
                                 lambda yes: start() if yes else self.warn("nothing replaced"))


    # --- background jobs ----------------------------------------------------------------------
    def job_running(self, job: str) -> bool:
        return job in self.jobs

    def run_job(self, job: str, action: Callable[[ProgressFn], Any], *, status: str | None = None,
                buttons: tuple[str, ...] = (), start_text: str = "", done_text: Callable[[Any], str] | None = None,
                threads: bool = True) -> bool:
        """Run ``action(progress)`` in a thread worker unless ``job`` is running (then warn); False
        if not started. ``status`` and ``buttons`` are widget selectors: the JobStatus that shows
        the job, the buttons disabled while it runs. ``done_text(result)`` is the line shown at the end."""
        from textual.widgets import Button

        from workbench.tui.widgets.job import JobStatus

        if job in self.jobs:
            self.warn(f"{job}: already running")
            return False
        self.jobs[job] = (status, buttons)
        for b in buttons:
            self.query_one(b, Button).disabled = True
        if status:
            self.query_one(status, JobStatus).start(start_text or f"{job}...")
        n_threads = self.config.threads if threads else None
        self.run_worker(partial(self._job_body, job, action, done_text, n_threads), thread=True, group=job,
                        exclusive=True, exit_on_error=False, description=job)
        return True

    def _job_body(self, job: str, action, done_text, threads: int | None) -> None:
        from textual.worker import get_current_worker

        from workbench.tui.config import apply_threads
        from workbench.tui.jobs import error_text
        from workbench.tui.messages import JobFailed, JobFinished, JobProgress

        worker = get_current_worker()

        def progress(ev: Progress) -> None:
            if worker.is_cancelled:
                raise JobCancelled
            text = f"{ev.stage}: {ev.text}" if ev.text else ev.stage
            if ev.done is not None and ev.total:
                text = f"{ev.stage} {ev.done}/{ev.total}" + (f": {ev.text}" if ev.text else "")
            self.post_message(JobProgress(job, ev.done, ev.total, text))

        try:
            if threads is not None:
                apply_threads(threads)
            result = action(progress)
        except JobCancelled:
            self.post_message(JobFailed(job, "cancelled"))
            return
        except Exception as e:  # noqa: BLE001  (shown as a notification; the app stays usable)
            self.post_message(JobFailed(job, error_text(e)))
            return
        self.post_message(JobFinished(job, result, done_text(result) if done_text else f"{job}: done"))

    def _end_job(self, job: str):
        from textual.widgets import Button

        from workbench.tui.widgets.job import JobStatus

        status, buttons = self.jobs.pop(job, (None, ()))
        for b in buttons:
            self.query_one(b, Button).disabled = False
        return self.query_one(status, JobStatus) if status else None

    def on_job_progress(self, message) -> None:
        from workbench.tui.widgets.job import JobStatus

        status = self.jobs.get(message.job, (None,))[0]
        if status:
            self.query_one(status, JobStatus).progress(message.done, message.total, message.text)

    # run_job's jobs only: a screen's own workers (the searches) post the same messages to its handlers
    def on_job_finished(self, message) -> None:
        if message.job not in self.jobs:
            return
        widget = self._end_job(message.job)
        if widget is not None:
            widget.finish(message.text)
        try:
            self.job_finished(message)
        except Exception as e:  # noqa: BLE001
            from workbench.tui.jobs import error_text

            self.error(error_text(e), title=f"{message.job} failed")

    def on_job_failed(self, message) -> None:
        if message.job not in self.jobs:
            return
        widget = self._end_job(message.job)
        if widget is not None:
            widget.fail(message.error)
        self.job_failed(message)

    def job_finished(self, message) -> None:
        """A job ended well: by default a notification with its line."""
        self.info(message.text, title=f"{message.job}: done")

    def job_failed(self, message) -> None:
        """A job failed: by default an error notification with its one-line message."""
        self.error(message.error, title=f"{message.job} failed")


def guarded(method):
    """Turn an exception in a handler or action into an error notification: an exception escaping
    a Textual handler would stop the widget's message loop and exit the app."""
    from workbench.tui.jobs import error_text

    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def run_async(self, *args, **kwargs):
            try:
                return await method(self, *args, **kwargs)
            except Exception as e:  # noqa: BLE001
                self.app.error(error_text(e), title=f"{method.__name__} failed")

        return run_async

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self.app.error(error_text(e), title=f"{method.__name__} failed")

    return run
