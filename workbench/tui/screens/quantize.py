"""Quantize: compress a model (ternary / 1-4 bit with LoRA adapters), optionally recover it by
distillation, and export it: `workbench quantize`, `workbench recover` and `workbench export` in one
run, calling the same library functions (``workbench.ops.quant``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Checkbox, Footer, Input, Label, Select

from workbench.errors import WorkbenchError
from workbench.progress import ProgressFn, emit
from workbench.tui.config import checked_device, device_choices
from workbench.tui.jobs import default_quant_export_out, default_quant_out, default_source_model, quant_configs
from workbench.tui.messages import JobFinished
from workbench.tui.screens.base import WorkbenchScreen, guarded
from workbench.tui.widgets import JobStatus, NavBar

EXPORT_CHOICES = (("no export", "none"), ("safetensors (compressed)", "safetensors"),
                  ("peft adapter + base", "peft"), ("hf (dequantized)", "hf"), ("gguf", "gguf"))


def device_select(current: str, widget_id: str) -> Select:
    """The device selector, set to the UI's configured device."""
    select = Select(device_choices(current), value=current, allow_blank=False, id=widget_id)
    select.styles.width = 22
    return select


@dataclass
class QuantPlan:
    """What one run does, resolved from the inputs before the worker starts."""
    source: Path  # the float model directory (also the recovery teacher)
    config: Path
    out: Path  # the compressed directory
    minutes: float  # recovery time budget; 0: no recovery
    recovered: Path | None  # the recovered compressed directory (with minutes > 0)
    fmt: str  # "none" or one of workbench.ops.quant.EXPORT_FORMATS
    export_out: Path | None
    overwrite: bool = False  # replace occupied outputs (the user confirmed it)
    device: str = "cpu"  # where every step computes (resolved: cpu, cuda or cuda:N)

    @property
    def final(self) -> Path:
        """The compressed directory the export reads."""
        return self.recovered or self.out

    @property
    def outputs(self) -> list[Path]:
        paths = [self.out, self.recovered, self.export_out]
        if self.fmt == "gguf" and self.export_out is not None:
            paths.append(self.export_out.with_name(self.export_out.stem + ".lora.gguf"))
        return [p for p in paths if p is not None]


@dataclass
class QuantResult:
    plan: QuantPlan
    quantized: dict  # ops.quant.quantize's report
    recovery: dict | None = None
    export: dict | None = None


def _bytes(n: int | None) -> str:
    from workbench.models.info import format_value

    return format_value("bytes", n)


def result_lines(r: QuantResult) -> list[str]:
    """The size report and the output paths, one line each."""
    q = r.quantized
    sizes = (f"  {q['quantized_layers']} layers at {q['bits_per_weight']:.3f} bits per weight "
             f"({q['bits_per_weight_with_adapters']:.3f} with adapters); linear {_bytes(q['linear_bytes'])}, "
             f"adapters {_bytes(q['adapter_bytes'])}, other {_bytes(q['other_bytes'])}, "
             f"on disk {_bytes(q['disk_bytes'])}; {q['seconds']:.1f} s")
    lines = [f"compressed: {r.plan.out}", sizes]
    if r.recovery is not None:
        rec = r.recovery
        lines += [f"recovered: {r.plan.recovered}",
                  f"  {rec['steps']} steps in {rec['seconds'] / 60:.1f} min, {rec['calibration_tokens']} tokens"]
    if r.export is not None:
        size = f" ({_bytes(r.export['bytes'])})" if "bytes" in r.export else ""
        lines.append(f"exported ({r.plan.fmt}): {r.export['path']}{size}")
        if "lora" in r.export:
            lines.append(f"  adapters: {r.export['lora']['path']}")
    return lines


class QuantizeScreen(WorkbenchScreen):
    MODE = "quantize"
    BINDINGS = [Binding("ctrl+r", "run_quantize", "Run", id="quantize.run",
                        tooltip="quantize, recover if a budget is set, export (workbench quantize/recover/export)"),
                Binding("ctrl+e", "app.switch_mode('qsearch')", "Search mode", id="quantize.search",
                        tooltip="search per-layer formats and ranks under a bits budget (the Quant search screen)")]

    def __init__(self) -> None:
        super().__init__()
        self.result: QuantResult | None = None
        self.picked: object = Select.BLANK  # the config list's value, to tell a new pick

    def compose(self) -> ComposeResult:
        yield NavBar("quantize")
        configs = [(p.name, str(p)) for p in quant_configs()]
        default = self.picked = next((v for n, v in configs if n == "2bit.yml"), Select.BLANK)
        source = default_source_model()
        with Vertical(id="quant-input", classes="panel"):
            yield Label("Model and quantization config", classes="section")
            with Horizontal(classes="controls"):
                yield Input(str(source) if source else "", id="quant-model",
                            placeholder="source model: a model directory or a model name in the home")
            with Horizontal(classes="controls"):
                yield Select(configs, value=default, prompt="quantization configs", id="quant-config-select")
                yield Input(id="quant-config", placeholder="or a quantization config file (overrides the list)")
        with Vertical(id="quant-output", classes="panel"):
            yield Label("Recovery, output and export", classes="section")
            with Horizontal(classes="controls"):
                yield Label("recovery minutes (0: none)", classes="caption")
                yield Input("0", id="quant-minutes", type="number")
                yield Input(id="quant-out", placeholder="output directory (blank: home/quantized/<model>-<config>)")
            with Horizontal(classes="controls"):
                yield Select(EXPORT_CHOICES, value="none", allow_blank=False, id="quant-format")
                yield Input(id="quant-export-out", placeholder="export path (blank: beside the output)")
                yield device_select(self.config.device, "quant-device")
                yield Checkbox("overwrite", id="quant-overwrite")
                yield Button("Run", id="quant-run", variant="success")
            yield JobStatus(idle="no quantization running", id="quant-job")
            yield Label(Text(""), id="quant-result")
        yield Footer(compact=True)

    @on(Select.Changed, "#quant-config-select")
    @guarded
    def _picked(self, event: Select.Changed) -> None:
        """A config picked from the list replaces a typed path (which would override it)."""
        if event.value != self.picked:
            self.picked = event.value
            self.query_one("#quant-config", Input).value = ""

    def _value(self, selector: str) -> str:
        return self.query_one(selector, Input).value.strip()

    def plan(self) -> QuantPlan | None:
        """The inputs, checked; None (after an error notification) when one is wrong."""
        from workbench.models.loader import model_kind, resolve_model

        raw = self._value("#quant-model")
        if not raw:
            self.error("give a source model: a model directory or a model name in the home")
            return None
        try:
            source = resolve_model(Path(raw).expanduser())
            if model_kind(source) != "float":
                raise WorkbenchError(f"{source}: a {model_kind(source)} model; quantize a float model directory")
        except WorkbenchError as e:
            self.error(str(e))
            return None
        select = self.query_one("#quant-config-select", Select)
        raw_config = self._value("#quant-config") or ("" if select.is_blank() else str(select.value))
        if not raw_config:
            self.error("choose a quantization config or give a config file")
            return None
        config = Path(raw_config).expanduser()
        if not config.is_file():
            self.error(f"{config}: quantization config not found")
            return None
        try:
            minutes = float(self._value("#quant-minutes") or 0)
        except ValueError:
            minutes = -1.0
        if not minutes >= 0:
            self.error("recovery minutes: expected a number >= 0 (0: no recovery)")
            return None
        out_raw = self._value("#quant-out")
        out = Path(out_raw).expanduser() if out_raw else default_quant_out(source.name, config)
        recovered = out.with_name(out.name + "-recovered") if minutes > 0 else None
        fmt = str(self.query_one("#quant-format", Select).value)
        export_raw = self._value("#quant-export-out")
        export_out = None if fmt == "none" else (
            Path(export_raw).expanduser() if export_raw else default_quant_export_out(recovered or out, fmt))
        try:
            device = checked_device(str(self.query_one("#quant-device", Select).value))
        except WorkbenchError as e:
            self.error(str(e).replace("--device", "device"))
            return None
        return QuantPlan(source, config, out, minutes, recovered, fmt, export_out,
                         self.query_one("#quant-overwrite", Checkbox).value, device)

    @on(Button.Pressed, "#quant-run")
    @guarded
    def action_run_quantize(self) -> None:
        if self.running:
            self.warn("a quantization is running")
            return
        plan = self.plan()
        if plan is None:
            return

        def start() -> None:
            self.query_one("#quant-result", Label).update(Text(""))
            self.run_job("quantize", lambda progress: quantize_plan(plan, progress), status="#quant-job",
                         buttons=("#quant-run",), start_text=f"quantizing {plan.source.name} with {plan.config.name}...",
                         done_text=done_line)

        self.start_if_outputs_free(plan.outputs, plan.overwrite, start)

    @property
    def running(self) -> bool:
        return self.job_running("quantize")

    def job_finished(self, message: JobFinished) -> None:
        self.result = message.result
        self.query_one("#quant-result", Label).update(Text("\n".join(result_lines(self.result)), style="green"))
        self.info(message.text, title="quantize done")


def quantize_plan(plan: QuantPlan, progress: ProgressFn) -> QuantResult:
    """The screen's run: :func:`workbench.ops.quant.quantize_recover_export` on the resolved plan."""
    from workbench.ops.quant import quantize_recover_export

    done = quantize_recover_export(plan.source, plan.config, plan.out, plan.minutes, plan.recovered, plan.fmt,
                                   plan.export_out, eval_task=None, overwrite=plan.overwrite, progress=progress,
                                   on_resume=lambda path: emit(progress, "recover", text=f"resuming from {path}"),
                                   device=plan.device)
    return QuantResult(plan, done["quantized"], done["recovery"], done["export"])


def done_line(result: QuantResult) -> str:
    q = result.quantized
    return (f"quantized to {result.plan.final} ({q['bits_per_weight_with_adapters']:.3f} bits per weight with "
            f"adapters, {q['bits_per_weight']:.3f} base){'' if result.export is None else ', exported'}")
