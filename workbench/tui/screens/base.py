"""What every screen shares: the tab bar on top, the footer, access to the config."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from textual.screen import Screen

if TYPE_CHECKING:
    from workbench.tui.app import WorkbenchApp
    from workbench.tui.config import TuiConfig


class WorkbenchScreen(Screen):
    MODE = ""

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
