"""The workbench terminal UI: one screen per view (modes), heavy work in thread workers.

Run ``workbench`` (no arguments) or ``workbench tui``. F1-F7 or the tabs switch screens,
ctrl+p lists every action, ctrl+q quits. Every action calls the same library functions as the
CLI, so anything done here can be done headless. ctrl+e on Search and Quant search composes a
search spec in a form (:mod:`workbench.tui.screens.builder`). On a first start a welcome names the
keys, and one keystroke starts a live search even before the zoo is built
(:mod:`workbench.tui.first_run`).
"""

from __future__ import annotations

from textual.app import App
from textual.binding import Binding
from textual.worker import WorkerState

from workbench.tui.commands import WorkbenchCommands
from workbench.tui.config import TuiConfig, load_config
from workbench.tui.first_run import FirstRun, mark_welcomed, should_welcome
from workbench.tui.jobs import error_text
from workbench.tui.screens import (
    ExportScreen,
    ModelsScreen,
    QuantizeScreen,
    QuantSearchScreen,
    RecipeScreen,
    RunsScreen,
    SearchScreen,
)


class WorkbenchApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "workbench"
    SUB_TITLE = "model merging and quantization"
    MODES = {"search": SearchScreen, "models": ModelsScreen, "recipe": RecipeScreen, "runs": RunsScreen,
             "export": ExportScreen, "quantize": QuantizeScreen, "qsearch": QuantSearchScreen}
    DEFAULT_MODE = "search"
    BINDINGS = [
        Binding("f1", "switch_mode('search')", "Search", id="mode.search", priority=True),
        Binding("f2", "switch_mode('models')", "Models", id="mode.models", priority=True),
        Binding("f3", "switch_mode('recipe')", "Recipe", id="mode.recipe", priority=True),
        Binding("f4", "switch_mode('runs')", "Runs", id="mode.runs", priority=True),
        Binding("f5", "switch_mode('export')", "Export", id="mode.export", priority=True),
        Binding("f6", "switch_mode('quantize')", "Quantize", id="mode.quantize", priority=True),
        Binding("f7", "switch_mode('qsearch')", "Quant search", id="mode.qsearch", priority=True),
        Binding("ctrl+q", "quit", "Quit", id="app.quit", priority=True),
    ]
    COMMANDS = App.COMMANDS | {WorkbenchCommands}

    def __init__(self, config: TuiConfig | None = None, search_options: dict | None = None,
                 first_run: FirstRun | None = None) -> None:
        """``search_options`` go to ``open_search`` as keyword arguments (e.g. ``device``).
        ``first_run``: what one keystroke starts on a fresh machine, and the welcome of a first start
        (``workbench tui`` passes the default; None: Start needs a spec, no welcome)."""
        super().__init__()
        self.config = config if config is not None else load_config()
        self.search_options = dict(search_options or {})
        self.first_run = first_run

    def search_kwargs(self) -> dict:
        return {"backend": self.config.backend, "workers": self.config.workers,
                "device": self.config.device} | self.search_options

    def on_mount(self) -> None:
        if self.config.theme in self.available_themes:
            self.theme = self.config.theme
        else:
            self.config.warnings.append(f"theme {self.config.theme!r} not found; expected one of "
                                        f"{', '.join(sorted(self.available_themes))}")
        for warning in self.config.warnings:
            self.notify(warning, title="config", severity="warning", markup=False, timeout=10)
        if self.first_run is not None and self.first_run.welcome and should_welcome(self.home, self.config.runs_dir):
            from workbench.tui.screens.welcome import WelcomeScreen

            self.push_screen(WelcomeScreen(), self._welcome_closed)

    @property
    def home(self):
        from workbench.home import workbench_home

        return workbench_home()

    def _welcome_closed(self, start: bool | None) -> None:
        try:
            mark_welcomed(self.home)
        except OSError as e:
            self.error(f"{self.home}: cannot remember the welcome was seen ({e})")
        if start:
            self.call_later(self._first_search)

    async def _first_search(self) -> None:
        await self.switch_mode("search")
        self.screen.start_first_search()

    def error(self, message: str, title: str = "error") -> None:
        """Every error ends here: a notification, never a crash."""
        self.notify(message, title=title, severity="error", markup=False, timeout=10)

    def on_worker_state_changed(self, event) -> None:
        # workers post their own errors; this catches whatever escaped them
        if event.state == WorkerState.ERROR and event.worker.error is not None:
            self.error(error_text(event.worker.error), title=f"{event.worker.description or 'job'} failed")


def run_app(config: TuiConfig | None = None) -> int:
    WorkbenchApp(config, first_run=FirstRun()).run()
    return 0
