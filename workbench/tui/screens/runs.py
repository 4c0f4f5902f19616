"""Runs: past search runs under the runs dir, their best scores; resume one, compare two."""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, DataTable, Footer, Input, Label

from workbench.tui.jobs import error_text
from workbench.tui.messages import JobFailed, RunsLoaded
from workbench.tui.runs import RunSummary, compare_runs, list_runs
from workbench.tui.screens.base import WorkbenchScreen, guarded
from workbench.tui.widgets import NavBar


class RunsScreen(WorkbenchScreen):
    MODE = "runs"
    BINDINGS = [
        Binding("ctrl+r", "refresh_runs", "Refresh", id="runs.refresh"),
        Binding("space", "mark", "Mark", id="runs.mark", tooltip="mark a run for comparison"),
        Binding("ctrl+g", "compare", "Compare", id="runs.compare", tooltip="compare the two marked runs"),
        Binding("ctrl+n", "resume", "Resume", id="runs.resume", tooltip="resume the selected run on Search"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[RunSummary] = []
        self.marked: list[Path] = []
        self.loading = False

    def compose(self) -> ComposeResult:
        yield NavBar("runs")
        with Horizontal(classes="controls"):
            yield Input(str(self.config.runs_dir), id="runs-root", placeholder="runs directory")
            yield Button("Refresh", id="refresh")
            yield Button("Mark", id="mark")
            yield Button("Compare", id="compare", variant="primary")
            yield Button("Resume", id="resume", variant="success")
        yield DataTable(id="runs", zebra_stripes=True, cursor_type="row")
        yield Label(Text("mark two runs (space) and press Compare (ctrl+g)"), id="compare-title", classes="section")
        yield DataTable(id="compare", zebra_stripes=True, cursor_type="row")
        yield Footer(compact=True)

    @guarded
    def on_mount(self) -> None:
        table = self.query_one("#runs", DataTable)
        for key, label in (("mark", "cmp"), ("run", "run"), ("name", "spec"), ("method", "method"),
                           ("gens", "generations"), ("evals", "evals"), ("best", "best score"),
                           ("status", "status"), ("modified", "modified")):
            table.add_column(label, key=key)

    @guarded
    def on_screen_resume(self) -> None:  # each time the screen is shown (Textual may say so twice)
        if not self.loading:
            self.action_refresh_runs()

    @property
    def root(self) -> Path:
        raw = self.query_one("#runs-root", Input).value.strip()
        return Path(raw).expanduser() if raw else self.config.runs_dir

    @on(Button.Pressed, "#refresh")
    @on(Input.Submitted, "#runs-root")
    @guarded
    def action_refresh_runs(self) -> None:
        self.loading = True
        self.load_runs(self.root)

    @work(thread=True, exclusive=True, group="runs-list", exit_on_error=False, description="list runs")
    def load_runs(self, root: Path) -> None:
        try:
            runs = list_runs(root)
        except Exception as e:  # noqa: BLE001
            self.post_message(JobFailed("list runs", error_text(e)))
            return
        self.post_message(RunsLoaded(root, runs))

    @guarded
    def on_runs_loaded(self, message: RunsLoaded) -> None:
        self.loading = False
        self.runs = message.runs
        table = self.query_one("#runs", DataTable)
        keep = table.cursor_row
        table.clear()
        for r in message.runs:
            gens = f"{r.generations}/{r.budget_generations}" if r.budget_generations else str(r.generations)
            table.add_row(Text("*" if r.path in self.marked else ""), Text(r.path.name), Text(r.name),
                          Text(r.method), Text(gens, justify="right"), Text(str(r.evaluations), justify="right"),
                          Text("-" if r.best is None else f"{r.best:.4f}", justify="right"),
                          Text(r.status, style="green" if r.status == "finished" else ""),
                          Text(time.strftime("%Y-%m-%d %H:%M", time.localtime(r.modified))), key=str(r.path))
        if message.runs:
            table.move_cursor(row=min(keep, len(message.runs) - 1))
        if not message.runs:
            self.query_one("#compare-title", Label).update(Text(f"no runs under {message.root} yet: start a "
                                                                f"search on the Search screen (F1)"))

    def selected(self) -> RunSummary | None:
        table = self.query_one("#runs", DataTable)
        if not self.runs or table.cursor_row < 0 or table.cursor_row >= len(self.runs):
            return None
        key = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value
        return next((r for r in self.runs if str(r.path) == key), None)

    @on(Button.Pressed, "#mark")
    @guarded
    def action_mark(self) -> None:
        run = self.selected()
        if run is None:
            return
        if run.path in self.marked:
            self.marked.remove(run.path)
        else:
            self.marked = (self.marked + [run.path])[-2:]
        table = self.query_one("#runs", DataTable)
        for r in self.runs:
            table.update_cell(str(r.path), "mark", Text("*" if r.path in self.marked else ""))

    @on(Button.Pressed, "#compare")
    @guarded
    def action_compare(self) -> None:
        if len(self.marked) != 2:
            self.warn("mark two runs first (space on a row)")
            return
        try:
            header, rows = compare_runs(*self.marked)
        except Exception as e:  # noqa: BLE001
            self.error(error_text(e))
            return
        table = self.query_one("#compare", DataTable)
        table.clear(columns=True)
        for i, h in enumerate(header):
            table.add_column(h, key=f"c{i}")
        for row in rows:
            table.add_row(Text(row[0]), *(Text(c, justify="right") for c in row[1:]))
        self.query_one("#compare-title", Label).update(Text(f"{header[1]} vs {header[2]}: best candidates"))

    @on(Button.Pressed, "#resume")
    @guarded
    async def action_resume(self) -> None:
        run = self.selected()
        if run is None:
            self.warn("no run selected")
            return
        await self.app.switch_mode("search")
        screen = self.app.screen
        if getattr(screen, "busy", False):
            self.warn("a search is running on the Search screen; pause or stop it first")
            return
        screen.resume_run(run.path)

    @guarded
    def on_job_failed(self, message: JobFailed) -> None:
        self.loading = False
        self.error(message.error, title=message.job)
