"""The one-screen welcome of a first start: what the workbench is and the keys that drive it."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

from workbench.tui.first_run import KEYS

INTRO = ("workbench merges models (every mergekit method), searches merge recipes with CMA-ES in memory, "
         "and quantizes to 1.58-4 bits with recovery adapters. Everything runs offline here.")


def keys_table() -> Table:
    table = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column()
    for key, what in KEYS:
        table.add_row(key, what)
    return table


class WelcomeScreen(ModalScreen[bool]):
    """Dismissed with True (enter or ctrl+r: start a live search) or False (escape: just close)."""

    BINDINGS = [Binding("enter,ctrl+r", "close(True)", "Start a search", priority=True),
                Binding("escape", "close(False)", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="welcome-box"):
            yield Label(Text("Welcome to the workbench", style="bold"), id="welcome-title")
            yield Label(INTRO, id="welcome-intro")
            yield Static(keys_table(), id="welcome-keys")
            with Horizontal(classes="controls"):
                yield Button("Start a live search (enter)", id="welcome-start", variant="success")
                yield Button("Close (escape)", id="welcome-close")

    def action_close(self, start: bool) -> None:
        self.dismiss(start)

    @on(Button.Pressed, "#welcome-start")
    def _start(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#welcome-close")
    def _close(self) -> None:
        self.dismiss(False)
