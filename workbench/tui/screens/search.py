"""Search: run an evolutionary merge search and watch it live.

Start opens a spec into a new run directory under the runs dir; Pause and Stop end the loop
after the candidate being scored (the generation in flight is dropped, the checkpoint of the
last complete generation stays); Resume reopens the run directory with
``open_search(..., resume=True)``, which replays that generation exactly.
"""

from __future__ import annotations

import math
import time
from collections import deque
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, HorizontalScroll, VerticalScroll
from textual.css.query import NoMatches
from textual.reactive import reactive
from textual.suggester import SuggestFromList
from textual.widgets import (
    Button,
    DataTable,
    Footer,
    Input,
    Label,
    ProgressBar,
    RichLog,
    Select,
    TabbedContent,
    TabPane,
)
from textual.worker import get_current_worker

from workbench.tui.config import apply_threads
from workbench.tui.first_run import FirstRun
from workbench.tui.heat import incumbent_heat
from workbench.tui.jobs import (
    default_spec,
    error_text,
    example_specs,
    new_run_dir,
)
from workbench.tui.messages import (
    CandidateScored,
    GenerationScored,
    JobFailed,
    ReportEntryScored,
    ReportReady,
    SearchEnded,
    SearchOpened,
)
from workbench.tui.runs import generation_stats
from workbench.tui.screens.base import WorkbenchScreen, guarded
from workbench.tui.widgets import CandidateTable, FitnessChart, HeatMap, JobStatus, NavBar, ReportChart

BUSY = ("preparing", "loading", "running", "pausing", "stopping", "reporting")


class Interrupted(Exception):
    """Raised from a search callback to leave the loop after the current candidate."""


class SearchControl:
    """Requests from the UI thread to one search worker (a plain attribute: set once, read often)."""

    def __init__(self) -> None:
        self.request: str | None = None  # "paused" or "stopped"


def _clock(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


class SearchScreen(WorkbenchScreen):
    MODE = "search"
    BINDINGS = [
        Binding("ctrl+r", "start", "Start", id="search.start", tooltip="start a new search from the spec"),
        Binding("ctrl+t", "pause", "Pause", id="search.pause", tooltip="pause after the current candidate"),
        Binding("ctrl+n", "resume", "Resume", id="search.resume", tooltip="resume the run directory"),
        Binding("ctrl+b", "stop", "Stop", id="search.stop", tooltip="stop after the current candidate"),
        Binding("ctrl+s", "save_recipe", "Save recipe", id="search.save_recipe",
                tooltip="write the incumbent recipe (mergekit YAML)"),
        Binding("ctrl+e", "build_spec", "Build spec", id="search.build_spec",
                tooltip="compose a search spec in a form (the spec shown opens into it)"),
    ]

    phase: reactive[str] = reactive("idle")

    def __init__(self) -> None:
        super().__init__()
        self.run_dir: Path | None = None
        self.spec_name: str | None = None
        self.total_generations: int | None = None
        self.population = 0
        self.in_generation = 0
        self.evaluations = 0
        self.elapsed = 0.0
        self.eta: float | None = None
        self.incumbent: float | None = None
        self.report: dict | None = None
        self._search = None  # the live Search, while its worker runs (for Save recipe)
        self._control: SearchControl | None = None
        self._started_at = 0.0
        self.message_lag: deque[float] = deque(maxlen=1000)  # seconds from a worker's post to its handling
        self.pending_spec: Path | None = None  # started when the search running now ends (the zoo's quick one)
        self.zoo_offered = False

    # --- layout -----------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        specs = [str(p) for p in example_specs()]
        first = self.wb.first_run
        default = default_spec() if first is None else (first.zoo_spec() if first.zoo_built() else None)
        yield NavBar("search")
        with Horizontal(classes="controls"):
            yield Select([(Path(p).name, p) for p in specs], prompt="example specs", id="spec-select")
            yield Input(value=str(default) if default else "", id="spec-path",
                        placeholder="search spec YAML (build the zoo for recipes/zoo-quick-search.yml)",
                        suggester=SuggestFromList(specs, case_sensitive=True))
            yield Input(id="run-dir",
                        placeholder="run directory (blank: Start makes a new one, Resume takes the last)")
        with Horizontal(classes="controls"):
            yield Button("Start", id="start", variant="success")
            yield Button("Pause", id="pause", variant="warning")
            yield Button("Resume", id="resume", variant="primary")
            yield Button("Stop", id="stop", variant="error")
            yield Button("Build spec", id="build-spec")
            yield Input(id="save-path", placeholder="recipe path (blank: recipes/<name>-best.yml)")
            yield Button("Save recipe", id="save")
        with Horizontal(id="search-progress"):
            yield Label("generations", classes="caption")
            yield ProgressBar(total=1, show_eta=False, id="gen-progress")
            yield Label("candidates", classes="caption")
            yield ProgressBar(total=1, show_eta=False, show_percentage=False, id="cand-progress")
        yield Label(Text("idle: pick a spec and press Start"), id="search-status")
        yield JobStatus(idle="", id="prep-job", classes="first-run-job")
        yield JobStatus(idle="", id="zoo-job", classes="first-run-job")
        with Horizontal(id="search-main"):
            yield CandidateTable(id="candidates")
            with VerticalScroll(id="search-side"):
                yield FitnessChart(id="fitness")
                with HorizontalScroll(id="heat-scroll"):
                    yield HeatMap(id="heatmap")
        with TabbedContent(id="search-bottom"):
            with TabPane("Log", id="tab-log"):
                yield RichLog(id="search-log", max_lines=5000, wrap=True)
            with TabPane("Held-out report", id="tab-report"):
                yield DataTable(id="report", zebra_stripes=True, cursor_type="row")
            with TabPane("Held-out chart", id="tab-report-chart"):
                yield ReportChart(id="report-chart")
        yield Footer(compact=True)

    @guarded
    def on_mount(self) -> None:
        self.watch_phase(self.phase)
        if self.query_one("#spec-path", Input).value:
            return
        if self.wb.first_run is not None:
            self.log_line("no zoo built: press ctrl+r for a search over the default model's seeded variants now "
                          "(KL and perplexity; the app offers to build the zoo meanwhile), ctrl+e to compose a spec")
        else:
            self.log_line("no zoo built: give a search spec path (see recipes/*-search.yml), or build the zoo "
                          "on the Models screen (F2) to use recipes/zoo-quick-search.yml")

    # --- small helpers ----------------------------------------------------------------------
    def log_line(self, text: str, style: str = "") -> None:
        self.query_one("#search-log", RichLog).write(Text(f"{time.strftime('%H:%M:%S')} {text}", style=style))

    @property
    def busy(self) -> bool:
        return self.phase in BUSY

    def watch_phase(self, phase: str) -> None:
        try:
            self.query_one("#start", Button)
        except NoMatches:  # not composed yet: on_mount calls this again
            return
        running = phase in ("running", "loading")
        if phase in ("finished", "failed") and self.pending_spec is not None:
            self.call_later(self._start_pending)
        self.query_one("#start", Button).disabled = self.busy
        self.query_one("#pause", Button).disabled = not running
        self.query_one("#resume", Button).disabled = self.busy
        self.query_one("#stop", Button).disabled = phase not in ("loading", "running", "pausing", "reporting")
        self.refresh_bindings()  # the footer greys out what check_action refuses
        self._status()

    def _status(self) -> None:
        total = self.total_generations
        done = self.query_one("#gen-progress", ProgressBar).progress
        parts = [self.phase]
        if self.spec_name:
            parts.append(self.spec_name)
        parts.append(f"generation {int(done)}/{total if total is not None else '?'}")
        if self.population:
            parts.append(f"candidate {self.in_generation}/{self.population + 1}")
        parts += [f"{self.evaluations} evals", f"elapsed {_clock(self.elapsed)}", f"ETA {_clock(self.eta)}",
                  f"incumbent {_fmt(self.incumbent)}"]
        if self.run_dir:
            parts.append(str(self.run_dir))
        self.query_one("#search-status", Label).update(Text(" · ".join(parts)))

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """Greys out the footer keys that do nothing in the current phase."""
        if action == "start":
            return not self.busy or None
        if action == "pause":
            return self.phase in ("running", "loading") or None
        if action == "resume":
            return not self.busy or None
        if action == "stop":
            return self.phase in ("loading", "running", "pausing", "reporting") or None
        return True

    # --- buttons and inputs -----------------------------------------------------------------
    @on(Select.Changed, "#spec-select")
    @guarded
    def _spec_selected(self, event: Select.Changed) -> None:
        if not event.select.is_blank():
            self.query_one("#spec-path", Input).value = str(event.value)

    @on(Button.Pressed, "#start")
    @guarded
    def _start_pressed(self) -> None:
        self.action_start()

    @on(Button.Pressed, "#pause")
    @guarded
    def _pause_pressed(self) -> None:
        self.action_pause()

    @on(Button.Pressed, "#resume")
    @guarded
    def _resume_pressed(self) -> None:
        self.action_resume()

    @on(Button.Pressed, "#stop")
    @guarded
    def _stop_pressed(self) -> None:
        self.action_stop()

    @on(Button.Pressed, "#save")
    @guarded
    def _save_pressed(self) -> None:
        self.action_save_recipe()

    # --- actions ----------------------------------------------------------------------------
    @guarded
    def action_start(self) -> None:
        if self.busy:
            self.warn("a search is running: pause or stop it first")
            return
        spec = self.query_one("#spec-path", Input).value.strip()
        if not spec and self.wb.first_run is not None:
            self.start_first_search()
            return
        if not spec:
            self.error("give a search spec path first (e.g. recipes/zoo-quick-search.yml)")
            return
        if not Path(spec).expanduser().is_file():
            self.error(f"{spec}: search spec not found")
            return
        given = self.query_one("#run-dir", Input).value.strip()
        run_dir = Path(given).expanduser() if given else new_run_dir(self.config.runs_dir, spec)
        if run_dir.exists() and any(run_dir.iterdir()):
            self.error(f"{run_dir} is not empty: resume it, or clear the run directory field for a new one")
            return
        self._launch(Path(spec).expanduser(), run_dir, resume=False)

    @guarded
    def action_resume(self) -> None:
        if self.busy:
            self.warn("the search is already running")
            return
        given = self.query_one("#run-dir", Input).value.strip()
        run_dir = Path(given).expanduser() if given else self.run_dir
        if run_dir is None:
            self.error("no run to resume: give its directory in the run directory field (or pick one on Runs, F4)")
            return
        self._launch(None, run_dir, resume=True)

    def resume_run(self, run_dir: Path) -> None:
        """Resume a run picked elsewhere (the Runs screen)."""
        if self.busy:
            self.warn("a search is running: pause or stop it first")
            return
        self._launch(None, run_dir, resume=True)

    def _launch(self, spec: Path | None, run_dir: Path, resume: bool) -> None:
        self.run_dir = run_dir
        self._control = SearchControl()
        self.report = None
        self.phase = "loading"
        self._started_at = time.perf_counter()
        self.log_line(("resuming " if resume else f"starting {spec} in ") + str(run_dir) + ": loading the sources...")
        self.run_search(spec, run_dir, resume, self._control)

    @guarded
    def action_pause(self) -> None:
        if self._control is None or self.phase not in ("running", "loading"):
            return
        self._control.request = "paused"
        self.phase = "pausing"
        self.log_line("pausing after the current candidate...")

    @guarded
    def action_stop(self) -> None:
        if self._control is None or not self.busy:
            return
        self._control.request = "stopped"
        self.phase = "stopping"
        self.log_line("stopping after the current candidate...")

    @guarded
    def action_save_recipe(self) -> None:
        from workbench.merge.recipe import save_recipe

        try:
            if self._search is not None and self._search.state.incumbent is not None:
                recipe = self._search.best_recipe()
            elif self.run_dir is not None and (self.run_dir / "history.jsonl").is_file():
                from workbench.ops.merge import recipe_source

                recipe = recipe_source(self.run_dir)
            else:
                self.warn("no candidate scored yet: nothing to save")
                return
            given = self.query_one("#save-path", Input).value.strip()
            name = self.spec_name or (self.run_dir.name if self.run_dir else "search")
            out = Path(given).expanduser() if given else Path("recipes") / f"{name}-best.yml"
            out.parent.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, out)
        except Exception as e:  # noqa: BLE001 - shown, never raised
            self.error(error_text(e))
            return
        self.info(f"incumbent recipe saved: {out}")
        self.log_line(f"incumbent recipe saved to {out}")

    # --- the builder ------------------------------------------------------------------------
    @on(Button.Pressed, "#build-spec")
    @guarded
    def action_build_spec(self) -> None:
        """Open the search builder; the spec shown (a merge spec file) opens into it."""
        from workbench.tui.screens.builder import MergeBuilderScreen, push_builder

        raw = self.query_one("#spec-path", Input).value.strip()
        path = Path(raw).expanduser() if raw else None
        if path is not None and not path.is_file():
            path = None
        push_builder(self.app, MergeBuilderScreen, path, self._built)

    def build_from(self, path: Path) -> None:
        """Open the builder on ``path`` (a merge spec another screen's builder handed over)."""
        self.query_one("#spec-path", Input).value = str(path)
        self.action_build_spec()

    def _built(self, path: Path, start: bool) -> None:
        self.query_one("#spec-select", Select).set_options([(p.name, str(p)) for p in example_specs()])
        self.query_one("#spec-path", Input).value = str(path)
        self.query_one("#run-dir", Input).value = ""
        self.log_line(f"search spec saved: {path}")
        if start:
            self.action_start()

    # --- the first run: one keystroke to a live search ----------------------------------------
    def show_job(self, selector: str) -> None:
        self.query_one(selector, JobStatus).add_class("-shown")

    @property
    def first_run(self) -> FirstRun:
        """The app's first-run steps (the defaults when the app was given none)."""
        if self.wb.first_run is None:
            self.wb.first_run = FirstRun(welcome=False)
        return self.wb.first_run

    @guarded
    def action_first_search(self) -> None:
        self.start_first_search()

    def start_first_search(self) -> None:
        """The zoo's quick search when the zoo is built; else the search over the default model's
        variants at once, and the offer to build the zoo (whose quick search follows)."""
        first = self.first_run
        if self.busy:
            self.warn("a search is running: pause or stop it first")
            return
        if first.zoo_built():
            spec = first.zoo_spec()
            if spec is not None:
                self._start_spec(spec)
                return
        if self.job_running("prepare search"):
            return
        self.phase = "preparing"
        self.show_job("#prep-job")
        self.log_line("no zoo yet: preparing a search over the default model's seeded variants...")
        self.run_job("prepare search", first.no_zoo_spec, status="#prep-job",
                     start_text="preparing the default model and its seeded variants (once)...",
                     done_text=lambda path: f"search spec ready: {path}")
        if not self.zoo_offered and not self.job_running("build zoo"):
            self.zoo_offered = True
            self.offer_zoo()

    def offer_zoo(self) -> None:
        from workbench.tui.screens.confirm import ConfirmScreen

        question = ("The default zoo (two experts fine-tuned from SmolLM2-135M-Instruct: arithmetic, French "
                    "numbers) is not built. Build it now? It takes about 11 minutes here; its quick search "
                    "starts when it is done. Meanwhile the search over the default model's variants runs.")
        self.app.push_screen(ConfirmScreen(question, yes="Build the zoo", no="Not now", danger=False),
                             lambda yes: self.build_zoo() if yes else self.log_line(
                                 "zoo not built; build it later on Models (F2, ctrl+b)"))

    def build_zoo(self) -> None:
        first = self.first_run
        if self.job_running("build zoo"):
            return
        self.show_job("#zoo-job")
        self.log_line("building the zoo (about 11 minutes here); its quick search starts when it is done")
        self.run_job("build zoo", first.build_zoo, status="#zoo-job",
                     start_text="building the zoo: preparing the base model...",
                     done_text=lambda _: "zoo built")

    def job_finished(self, message) -> None:
        if message.job == "prepare search":
            self.query_one("#prep-job", JobStatus).remove_class("-shown")
            self.log_line(message.text)
            self.phase = "idle"
            self._start_spec(Path(message.result))
        elif message.job == "build zoo":
            self.info(message.text, title="zoo")
            spec = self.first_run.zoo_spec()
            if spec is None:
                self.warn("zoo built, but no quick search spec (recipes/zoo-quick-search.yml) was found")
                return
            self.pending_spec = Path(spec)
            if self.busy:
                self.log_line(f"zoo built: {Path(spec).name} starts when the search running now ends")
            else:
                self._start_pending()
        else:
            super().job_finished(message)

    def job_failed(self, message) -> None:
        if message.job == "prepare search":
            self.phase = "failed"
        self.log_line(f"{message.job} failed: {message.error}", "red")
        super().job_failed(message)

    def _start_pending(self) -> None:
        spec, self.pending_spec = self.pending_spec, None
        if spec is not None and not self.busy:
            self._start_spec(spec)

    def _start_spec(self, spec: Path) -> None:
        self.query_one("#spec-path", Input).value = str(spec)
        self.query_one("#run-dir", Input).value = ""
        self.action_start()

    # --- the worker -------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="search", exit_on_error=False, description="merge search")
    def run_search(self, spec: Path | None, run_dir: Path, resume: bool, control: SearchControl) -> None:
        from workbench.ops.search import open_search
        from workbench.search.report import heldout_report

        worker = get_current_worker()

        def interrupted() -> bool:
            return control.request is not None or worker.is_cancelled

        try:
            apply_threads(self.config.threads)
            search = open_search(spec, None if resume else run_dir, run_dir if resume else None,
                                 **self.wb.search_kwargs())
        except Exception as e:  # noqa: BLE001
            self.post_message(JobFailed("search", error_text(e)))
            return
        try:
            self.post_message(SearchOpened(search, run_dir, resume, list(search.state.history),
                                           incumbent_heat(search)))

            def on_candidate(event) -> None:
                self.post_message(CandidateScored(event))
                if interrupted():
                    raise Interrupted

            def on_generation(event) -> None:
                self.post_message(GenerationScored(event, incumbent_heat(search)))

            try:
                state = search.run(on_candidate=on_candidate, on_generation=on_generation, should_stop=interrupted)
                reason = state.stop_reason
            except Interrupted:
                reason = "stopped"
            if reason == "stopped":
                self.post_message(SearchEnded(run_dir, control.request or "cancelled", True, False))
                return
            report = search.state.incumbent is not None
            self.post_message(SearchEnded(run_dir, reason, False, report))
            if report:
                def on_entry(row: dict) -> None:
                    self.post_message(ReportEntryScored(row))
                    if interrupted():
                        raise Interrupted

                try:
                    self.post_message(ReportReady(heldout_report(search, top=3, on_entry=on_entry)))
                except Interrupted:
                    self.post_message(JobFailed("report", "held-out report stopped"))
        except Exception as e:  # noqa: BLE001
            self.post_message(JobFailed("search", error_text(e)))
        finally:
            search.close()

    # --- messages from the worker -----------------------------------------------------------
    @guarded
    def on_search_opened(self, message: SearchOpened) -> None:
        search = message.search
        self._search = search
        spec, state = search.spec, search.state
        self.spec_name = spec.name
        self.total_generations = spec.budget.generations
        self.population = spec.budget.population
        self.in_generation = 0
        self.evaluations, self.elapsed, self.eta = state.evaluations, state.elapsed, search.eta()
        self.incumbent = state.incumbent["score"] if state.incumbent else None
        table = self.query_one(CandidateTable)
        table.reset()
        for row in message.history:
            table.add_history_row(row)
        chart = self.query_one(FitnessChart)
        chart.reset()
        for _, best, mean in generation_stats(message.history):
            chart.add(best, mean)
        for row in message.history:
            chart.add_candidate(row["generation"], row.get("score"))
        self.query_one(ReportChart).reset()
        self.query_one(HeatMap).show(message.heat)
        self.query_one("#gen-progress", ProgressBar).update(total=self.total_generations, progress=state.generation)
        self.query_one("#cand-progress", ProgressBar).update(total=self.population + 1, progress=0)
        self.query_one("#report", DataTable).clear(columns=True)
        seconds = time.perf_counter() - self._started_at
        self.log_line(f"{spec.name}: {spec.merge_method}, {search.layout.describe()}, seed {spec.seed}; "
                      f"loaded in {seconds:.1f} s" + (f"; resuming after generation {state.generation}"
                                                      if message.resumed else ""))
        if self.phase == "loading":
            self.phase = "running"
        self._status()

    @guarded
    def on_candidate_scored(self, message: CandidateScored) -> None:
        self.message_lag.append(time.monotonic() - message.time)
        ev = message.event
        self.query_one(CandidateTable).add_candidate(ev.generation, ev.index, ev.kind, ev.score, ev.tasks, ev.seconds,
                                                     ev.merge_seconds, ev.error)
        self.in_generation += 1
        self.query_one(FitnessChart).add_candidate(ev.generation, ev.score)
        self.query_one("#cand-progress", ProgressBar).update(progress=self.in_generation)
        if ev.error:
            self.log_line(f"gen {ev.generation} #{ev.index} failed: {ev.error}", "red")
        self._status()

    @guarded
    def on_generation_scored(self, message: GenerationScored) -> None:
        ev = message.event
        self.in_generation = 0
        self.evaluations, self.elapsed, self.eta, self.incumbent = ev.evaluations, ev.elapsed, ev.eta, ev.incumbent
        self.query_one(FitnessChart).add(ev.best, ev.mean)
        self.query_one(HeatMap).show(message.heat)
        self.query_one("#gen-progress", ProgressBar).update(progress=ev.generation + 1)
        self.query_one("#cand-progress", ProgressBar).update(progress=0)
        self.log_line(f"gen {ev.generation}: best {_fmt(ev.best)} mean {_fmt(ev.mean)} incumbent {_fmt(ev.incumbent)}"
                      f" | {ev.evaluations} evals, ETA {_clock(ev.eta)}")
        self._status()

    @guarded
    def on_search_ended(self, message: SearchEnded) -> None:
        if message.reason in ("paused", "stopped", "cancelled"):
            self._search = None
            self.phase = "paused" if message.reason == "paused" else "stopped"
            self.in_generation = 0
            self.query_one("#cand-progress", ProgressBar).update(progress=0)
            text = (f"search {self.phase} after the current candidate; the unfinished generation is dropped and "
                    f"replays on resume ({message.run_dir})")
            self.log_line(text, "yellow")
            self.info(f"search {self.phase}: Resume (ctrl+n) continues {message.run_dir.name}")
        else:
            self.log_line(f"search ended: {message.reason}; best recipe in {message.run_dir / 'best.yml'}", "green")
            if message.report_follows:
                self.phase = "reporting"
                self.log_line("held-out report: scoring the best candidates and the baselines...")
            else:
                self._search = None
                self.phase = "finished"
                self.info(f"search finished ({message.reason})")

    @guarded
    def on_report_entry_scored(self, message: ReportEntryScored) -> None:
        from workbench.search.report import main_metric

        row = message.row
        table = self.query_one("#report", DataTable)
        tasks = list(row["heldout"])
        if not table.columns:
            table.add_column("model", key="model")
            table.add_column("search score", key="search")
            for t in tasks:
                table.add_column(f"{t} (held-out)", key=t)
        cells = [Text(row["name"]), _score_text(row["search_score"])]
        for t in tasks:
            name, value = main_metric(row["heldout"][t])
            cells.append(Text(f"{_fmt(value)} {name}", justify="right"))
        table.add_row(*cells)
        self.query_one(ReportChart).add_row(row)
        self.log_line(f"report: {row['name']} scored")

    @guarded
    def on_report_ready(self, message: ReportReady) -> None:
        self.report = message.report
        self._search = None
        self.phase = "finished"
        self.query_one("#search-bottom", TabbedContent).active = "tab-report"
        self.log_line(f"held-out report written to {self.run_dir / 'report.md' if self.run_dir else 'the run'}",
                      "green")
        self.info("search finished: held-out report ready")

    @guarded
    def on_job_failed(self, message: JobFailed) -> None:
        if message.job in self.jobs:  # a run_job job (the first run's preparation, the zoo build):
            return                      # WorkbenchScreen's handler (called after this one) ends it
        self._search = None
        if message.job == "report" and self._control is not None and self._control.request:
            self.phase = "finished"  # stopped by the user during the report: the search itself is done
            self.log_line(message.error, "yellow")
            self.warn(message.error)
            return
        self.phase = "failed" if message.job == "search" else "finished"
        self.log_line(f"{message.job} failed: {message.error}", "red")
        self.error(message.error, title=f"{message.job} failed")


def _score_text(value) -> Text:
    return Text(_fmt(value) if value is not None else "", justify="right")
