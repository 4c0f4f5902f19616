"""Export: a merged model (Hugging Face directory) from a recipe or a run's best recipe.

Compressed (quantized) models are made and exported on the Quantize screen (F6); a section here
points there.
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Checkbox, Footer, Input, Label, Select, Static

from workbench.tui.config import checked_device
from workbench.tui.jobs import default_merge_out, example_recipes
from workbench.tui.messages import JobFinished
from workbench.tui.runs import is_run_dir
from workbench.tui.screens.base import WorkbenchScreen, guarded
from workbench.tui.screens.quantize import device_select
from workbench.tui.widgets import JobStatus, NavBar

COMPRESSED_NOTE = (
    "Compressed models (ternary or 1-4 bit quantization with LoRA adapters, optional recovery by distillation) "
    "and their exports (safetensors, peft, HF, GGUF) are made on the Quantize screen (F6), with the same "
    "library calls as `workbench quantize`, `workbench recover` and `workbench export`."
)


class ExportScreen(WorkbenchScreen):
    MODE = "export"
    BINDINGS = [Binding("ctrl+r", "export", "Export merged model", id="export.merged")]

    def __init__(self) -> None:
        super().__init__()
        self.result: Path | None = None

    def compose(self) -> ComposeResult:
        yield NavBar("export")
        with Vertical(id="export-merged", classes="panel"):
            yield Label("Merged model (Hugging Face safetensors directory)", classes="section")
            with Horizontal(classes="controls"):
                yield Select([], prompt="recipes and runs", id="export-select")
                yield Input(id="export-source", placeholder="a recipe file, or a search run directory (its best recipe)")
            with Horizontal(classes="controls"):
                yield Input(id="export-out", placeholder="output directory (blank: $WORKBENCH_HOME/merges/<name>)")
                yield device_select(self.config.device, "export-device")
                yield Checkbox("overwrite", id="export-overwrite")
                yield Button("Export", id="export", variant="success")
            yield JobStatus(idle="no export running", id="export-job")
            yield Label(Text(""), id="export-result")
        with Vertical(id="export-compressed", classes="panel"):
            yield Label("Compressed model (quantized)", classes="section")
            yield Static(Text(COMPRESSED_NOTE), id="compressed-note")
            yield Button("Go to Quantize (F6)", id="goto-quantize")
        yield Footer(compact=True)

    @guarded
    def on_screen_resume(self) -> None:  # each time the screen is shown, the first time included
        self.refresh_sources()

    def refresh_sources(self) -> None:
        options = [(f"recipe: {p.name}", str(p)) for p in example_recipes()]
        root = self.config.runs_dir
        if root.is_dir():
            runs = sorted((d for d in root.iterdir() if is_run_dir(d)), key=lambda d: -d.stat().st_mtime)
            options += [(f"run: {d.name}", str(d)) for d in runs]
        self.query_one("#export-select", Select).set_options(options)

    @on(Select.Changed, "#export-select")
    @guarded
    def _picked(self, event: Select.Changed) -> None:
        if not event.select.is_blank():
            self.query_one("#export-source", Input).value = str(event.value)

    @on(Button.Pressed, "#goto-quantize")
    @guarded
    def _goto_quantize(self) -> None:
        self.app.switch_mode("quantize")

    @on(Button.Pressed, "#export")
    @guarded
    def action_export(self) -> None:
        if self.job_running("export"):
            self.warn("an export is running")
            return
        raw = self.query_one("#export-source", Input).value.strip()
        if not raw:
            self.error("give a recipe file or a run directory to export")
            return
        source = Path(raw).expanduser()
        if not source.exists():
            self.error(f"{source}: no such recipe file or run directory")
            return
        out_raw = self.query_one("#export-out", Input).value.strip()
        name = source.name if source.is_dir() else source.stem
        out = Path(out_raw).expanduser() if out_raw else default_merge_out(name)
        overwrite = self.query_one("#export-overwrite", Checkbox).value
        from workbench.errors import WorkbenchError

        try:
            device = checked_device(str(self.query_one("#export-device", Select).value))
        except WorkbenchError as e:
            self.error(str(e).replace("--device", "device"))
            return

        def start() -> None:
            from workbench.ops.merge import merge

            self.query_one("#export-result", Label).update(Text(""))
            self.run_job("export", lambda progress: merge(source, out, device=device, overwrite=overwrite,
                                                          progress=progress),
                         status="#export-job", buttons=("#export",), start_text=f"exporting {source.name} into {out}...",
                         done_text=lambda r: f"exported {r.num_tensors} tensors to {r.out_dir} "
                                             f"({r.bytes_written / 1e6:.1f} MB) in {r.seconds:.1f} s")

        self.start_if_outputs_free([out], overwrite, start)

    def job_finished(self, message: JobFinished) -> None:
        self.result = message.result.out_dir
        self.query_one("#export-result", Label).update(Text(f"result: {self.result}", style="bold green"))
        self.info(message.text, title="export done")
