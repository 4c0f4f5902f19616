"""Models: what is in the workbench home (and any added by path), the zoo, and the background jobs
that prepare the default model and build the zoo (``workbench.ops.models`` / ``workbench.ops.zoo``)."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, DataTable, Footer, Input, Label

from workbench.tui.jobs import error_text
from workbench.tui.messages import JobFailed, JobFinished, ModelsLoaded
from workbench.tui.screens.base import WorkbenchScreen, guarded
from workbench.tui.widgets import JobStatus, NavBar

MODEL_COLUMNS = (("name", "name"), ("format", "format"), ("architecture", "architecture"),
                 ("parameters", "params"), ("dtype", "dtype"), ("layers", "layers"), ("hidden_size", "hidden"),
                 ("bytes", "size"), ("path", "path"))


class ModelsScreen(WorkbenchScreen):
    MODE = "models"
    BINDINGS = [
        Binding("ctrl+r", "refresh_models", "Refresh", id="models.refresh"),
        Binding("ctrl+g", "prepare_default", "Prepare default", id="models.prepare_default",
                tooltip="convert SmolLM2-135M-Instruct into the home (workbench models prepare-default)"),
        Binding("ctrl+b", "build_zoo", "Build zoo", id="models.build_zoo",
                tooltip="train the zoo's missing experts (workbench zoo build)"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.extra: list[Path] = []
        self.models: list[dict] = []

    def compose(self) -> ComposeResult:
        yield NavBar("models")
        with Horizontal(classes="controls"):
            yield Input(id="model-path", placeholder="add a model by path: a model directory or a .gguf file")
            yield Button("Add", id="add")
            yield Button("Refresh", id="refresh")
            yield Button("Prepare default model", id="prepare", variant="primary")
            yield Button("Build zoo", id="build-zoo", variant="primary")
        yield JobStatus(idle="no job running", id="models-job")
        yield Label("models", classes="section")
        yield DataTable(id="models", zebra_stripes=True, cursor_type="row")
        yield Label("default zoo (base + experts for the merge search)", classes="section")
        yield DataTable(id="zoo", zebra_stripes=True, cursor_type="row")
        yield Footer(compact=True)

    @guarded
    def on_mount(self) -> None:
        table = self.query_one("#models", DataTable)
        for key, label in MODEL_COLUMNS:
            table.add_column(label, key=key)
        zoo = self.query_one("#zoo", DataTable)
        for col in ("name", "role", "state", "path"):
            zoo.add_column(col, key=col)
        self.action_refresh_models()

    # --- listing ----------------------------------------------------------------------------
    @guarded
    def action_refresh_models(self) -> None:
        self.load_models(list(self.extra))

    @work(thread=True, exclusive=True, group="models-list", exit_on_error=False, description="list models")
    def load_models(self, extra: list[Path]) -> None:
        from workbench.models.info import list_models, model_info

        try:
            rows = list_models()
            for path in extra:
                try:
                    rows.append(model_info(path))
                except Exception as e:  # noqa: BLE001 - one bad path keeps its row, with the error
                    rows.append({"name": path.name, "path": str(path), "error": error_text(e)})
            try:
                from workbench.zoo.build import zoo_status
            except ImportError:  # a checkout without the zoo
                zoo = []
            else:
                zoo = zoo_status()
        except Exception as e:  # noqa: BLE001
            self.post_message(JobFailed("list models", error_text(e)))
            return
        self.post_message(ModelsLoaded(rows, zoo))

    @guarded
    def on_models_loaded(self, message: ModelsLoaded) -> None:
        from workbench.models.info import format_value

        self.models = message.models
        table = self.query_one("#models", DataTable)
        table.clear()
        for row in message.models:
            if "error" in row:
                cells = [Text(row.get("name", "?")), Text("unreadable", style="red")] + \
                        [Text("") for _ in MODEL_COLUMNS[2:-1]] + [Text(row["error"], style="red")]
            else:
                cells = [Text(format_value(key, row.get(key)),
                              justify="right" if key in ("parameters", "layers", "hidden_size", "bytes") else "left")
                         for key, _ in MODEL_COLUMNS]
            table.add_row(*cells, key=row.get("path"))
        zoo = self.query_one("#zoo", DataTable)
        zoo.clear()
        for row in message.zoo:
            zoo.add_row(Text(row["name"]), Text(row["role"]),
                        Text(row["state"], style="green" if row["state"] == "built" else "yellow"), Text(row["path"]))

    @on(Button.Pressed, "#refresh")
    @guarded
    def _refresh_pressed(self) -> None:
        self.action_refresh_models()

    @on(Button.Pressed, "#add")
    @on(Input.Submitted, "#model-path")
    @guarded
    def _add(self) -> None:
        raw = self.query_one("#model-path", Input).value.strip()
        if not raw:
            self.warn("type a model directory or .gguf path first")
            return
        path = Path(raw).expanduser().absolute()
        if not path.exists():
            self.error(f"{path}: no such model directory or .gguf file")
            return
        if path not in self.extra:
            self.extra.append(path)
        self.query_one("#model-path", Input).value = ""
        self.action_refresh_models()

    # --- jobs (one at a time: they share the status line) ------------------------------------
    def _start(self, job: str, action, text: str, done_text) -> None:
        if self.jobs:
            self.warn(f"{next(iter(self.jobs))} is running; wait for it to finish")
            return
        self.run_job(job, action, status="#models-job", buttons=("#prepare", "#build-zoo"), start_text=text,
                     done_text=done_text)

    @on(Button.Pressed, "#prepare")
    @guarded
    def action_prepare_default(self) -> None:
        from workbench.ops.models import prepare_default

        self._start("prepare default", lambda progress: prepare_default(progress=progress),
                    "preparing SmolLM2-135M-Instruct (GGUF -> safetensors)...",
                    lambda path: f"default model ready: {path}")

    @on(Button.Pressed, "#build-zoo")
    @guarded
    def action_build_zoo(self) -> None:
        from workbench.ops.zoo import build

        self._start("build zoo", lambda progress: build(progress=progress),
                    "building the zoo: preparing the base model...",
                    lambda paths: f"zoo built: {', '.join(p.name for p in paths)}")

    def job_finished(self, message: JobFinished) -> None:
        self.info(message.text, title=message.job)
        self.action_refresh_models()

    @guarded
    def on_job_failed(self, message: JobFailed) -> None:
        if message.job == "list models":   # the listing's own worker; run_job's jobs end in the base handler
            self.error(message.error, title="list models failed")
