"""Quant search: the quantization search (per-layer formats and adapter ranks under bits budgets),
its live quality-vs-size plot and front, and actions on a front point: build it (quantize by its
config), recover it with a time budget, export it. The same library functions as `workbench search
SPEC` (kind: quantization), `workbench quantize`, `recover` and `export`.

A separate mode beside Quantize (F7; ctrl+e there opens it): the Quantize screen runs one config,
this one searches for the configs."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Checkbox, DataTable, Footer, Input, Label, Select
from textual.worker import get_current_worker

from workbench.tui.config import apply_threads, checked_device
from workbench.tui.jobs import error_text, recipe_dirs
from workbench.tui.messages import JobFailed, JobFinished, JobProgress
from workbench.tui.screens.base import WorkbenchScreen, guarded
from workbench.tui.screens.quantize import EXPORT_CHOICES, device_select
from workbench.tui.widgets import JobStatus, NavBar
from workbench.tui.widgets.front_plot import FrontPlot


class QuantGeneration(Message):
    """A generation ended: ``rows`` are the history so far (for the plot), ``event`` the parents."""

    def __init__(self, event, rows: list[dict], windows: int) -> None:
        super().__init__()
        self.event, self.rows, self.windows = event, rows, windows


class QuantSearchEnded(Message):
    """The loop returned (``reason``: the budget, "paused" or "stopped"); ``front`` when computed."""

    def __init__(self, run_dir: Path, reason: str, front: dict | None) -> None:
        super().__init__()
        self.run_dir, self.reason, self.front = run_dir, reason, front


def quant_search_specs() -> list[Path]:
    """The example quantization search specs (recipes/*-search.yml with kind: quantization)."""
    from workbench.quant.search.spec import spec_kind

    out = []
    for d in recipe_dirs():
        for p in sorted(d.glob("*-search.yml")):
            try:
                if spec_kind(p) == "quantization":
                    out.append(p)
            except Exception:  # noqa: BLE001 - a broken file is not offered
                continue
    return out


def plot_points(rows: list[dict], windows: int, front: dict | None = None) -> list[tuple[float, float, str]]:
    """(bpw, search KL, kind) of every config scored on the last stage's windows: uniform ones,
    the front (from `front` when given, else computed from the rows), and the rest."""
    from workbench.quant.search.run import pareto_rows, unique_rows

    unique = unique_rows(rows, windows)
    on_front = ({tuple(p["config"]) for p in front["front"]} if front
                else {tuple(r["config"]) for r in pareto_rows(list(unique.values()))})
    return [(r["bpw"], r["fitness"], "front" if c in on_front else "uniform" if r["kind"] == "uniform" else "other")
            for c, r in unique.items()]


class QuantSearchScreen(WorkbenchScreen):
    MODE = "qsearch"
    BINDINGS = [
        Binding("ctrl+r", "start", "Start", id="qsearch.start", tooltip="start a new quantization search"),
        Binding("ctrl+t", "pause", "Pause", id="qsearch.pause", tooltip="pause after the current generation"),
        Binding("ctrl+n", "resume", "Resume", id="qsearch.resume", tooltip="resume the run directory"),
        Binding("ctrl+b", "stop", "Stop", id="qsearch.stop", tooltip="stop after this generation and score the front"),
        Binding("ctrl+g", "build_point", "Build point", id="qsearch.build",
                tooltip="quantize the selected front point, recover it, export it"),
        Binding("ctrl+e", "build_spec", "Build spec", id="qsearch.build_spec",
                tooltip="compose a quantization search spec in a form (the spec chosen opens into it)"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.running = False
        self.request: str | None = None  # "paused" or "stopped", read by the worker between generations
        self.front: dict | None = None
        self.run_dir: Path | None = None
        self.built: dict | None = None

    def compose(self) -> ComposeResult:
        yield NavBar("qsearch")
        specs = [(p.name, str(p)) for p in quant_search_specs()]
        short = next((v for n, v in specs if "short" in n), specs[0][1] if specs else Select.BLANK)
        with Vertical(id="qs-input", classes="panel"):
            yield Label("Quantization search: spec and run directory", classes="section")
            with Horizontal(classes="controls"):
                yield Select(specs, value=short, prompt="quantization search specs", id="qs-spec-select")
                yield Input(id="qs-spec", placeholder="or a spec file (kind: quantization; overrides the list)")
            with Horizontal(classes="controls"):
                yield Input(id="qs-run", placeholder="run directory (blank: runs/<spec name>)")
                yield Button("Start", id="qs-start", variant="success")
                yield Button("Pause", id="qs-pause")
                yield Button("Resume", id="qs-resume")
                yield Button("Stop", id="qs-stop", variant="error")
                yield Button("Build spec", id="qs-build-spec")
                yield device_select(self.config.device, "qs-device")
            yield JobStatus(idle="no quantization search running", id="qs-job")
        with Vertical(id="qs-front", classes="panel"):
            yield Label("Quality vs size", classes="section")
            yield FrontPlot(id="qs-plot")
            yield DataTable(id="qs-table", cursor_type="row", zebra_stripes=True)
        with Vertical(id="qs-point", classes="panel"):
            yield Label("Selected point: build, recover, export", classes="section")
            with Horizontal(classes="controls"):
                yield Label("recovery minutes (0: none)", classes="caption")
                yield Input("0", id="qs-minutes", type="number")
                yield Input(id="qs-out", placeholder="output directory (blank: RUN/point-K)")
                yield Select(EXPORT_CHOICES, value="none", allow_blank=False, id="qs-format")
                yield Checkbox("overwrite", id="qs-overwrite")
                yield Button("Build", id="qs-build", variant="primary")
            yield JobStatus(idle="no point being built", id="qs-point-job")
            yield Label(Text(""), id="qs-result")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one("#qs-table", DataTable)
        table.add_columns("point", "total bpw", "base", "adapters", "search KL", "held-out KL", "held-out ppl",
                          "layers")

    # --- inputs -----------------------------------------------------------------------------
    def _value(self, selector: str) -> str:
        return self.query_one(selector, Input).value.strip()

    def _device(self) -> str | None:
        """The device chosen, resolved (the search and a point's build run there); None after an
        error notification (e.g. cuda where there is none)."""
        from workbench.errors import WorkbenchError

        try:
            return checked_device(str(self.query_one("#qs-device", Select).value))
        except WorkbenchError as e:
            self.error(str(e).replace("--device", "device"))
            return None

    def _spec(self) -> Path | None:
        select = self.query_one("#qs-spec-select", Select)
        raw = self._value("#qs-spec") or ("" if select.is_blank() else str(select.value))
        if not raw:
            self.error("choose a quantization search spec or give a spec file")
            return None
        return Path(raw).expanduser()

    def _run_dir(self, spec: Path | None) -> Path:
        raw = self._value("#qs-run")
        if raw:
            return Path(raw).expanduser()
        return self.config.runs_dir / (spec.stem.removesuffix("-search") if spec else "quant-search")

    # --- actions ----------------------------------------------------------------------------
    @on(Button.Pressed, "#qs-start")
    @guarded
    def action_start(self) -> None:
        from workbench.quant.search.spec import load_quant_search_spec

        if self.running:
            self.warn("a quantization search is running")
            return
        spec = self._spec()
        if spec is None:
            return
        load_quant_search_spec(spec)  # a bad spec errors here, file:line: field, before any work
        self._launch(spec, self._run_dir(spec), resume=False)

    @on(Button.Pressed, "#qs-resume")
    @guarded
    def action_resume(self) -> None:
        if self.running:
            self.warn("a quantization search is running")
            return
        run_dir = self.run_dir or self._run_dir(self._spec())
        if not (run_dir / "checkpoint.json").is_file():
            self.error(f"{run_dir}: nothing to resume (no checkpoint.json)")
            return
        self._launch(None, run_dir, resume=True)

    @on(Button.Pressed, "#qs-build-spec")
    @guarded
    def action_build_spec(self) -> None:
        """Open the quantization search builder on the spec chosen (if any)."""
        from workbench.tui.screens.builder import QuantBuilderScreen, push_builder

        select = self.query_one("#qs-spec-select", Select)
        raw = self._value("#qs-spec") or ("" if select.is_blank() else str(select.value))
        path = Path(raw).expanduser() if raw and Path(raw).expanduser().is_file() else None
        push_builder(self.app, QuantBuilderScreen, path, self._built)

    def build_from(self, path: Path) -> None:
        """Open the builder on ``path`` (a quantization spec another screen's builder handed over)."""
        self.query_one("#qs-spec", Input).value = str(path)
        self.action_build_spec()

    def _built(self, path: Path, start: bool) -> None:
        self.query_one("#qs-spec", Input).value = str(path)
        if start:
            self.action_start()

    def _launch(self, spec: Path | None, run_dir: Path, resume: bool) -> None:
        device = self._device()
        if device is None:
            return
        self.running, self.request, self.run_dir, self.front = True, None, run_dir, None
        self.query_one("#qs-job", JobStatus).start(("resuming " if resume else f"starting {spec.name} in ")
                                                   + f"{run_dir}: model, layer database, teacher...")
        self.search_job(spec, run_dir, resume, device)

    @on(Button.Pressed, "#qs-pause")
    @guarded
    def action_pause(self) -> None:
        if self.running:
            self.request = "paused"
            self.query_one("#qs-job", JobStatus).progress(None, None, "pausing after this generation...")

    @on(Button.Pressed, "#qs-stop")
    @guarded
    def action_stop(self) -> None:
        if self.running:
            self.request = "stopped"
            self.query_one("#qs-job", JobStatus).progress(None, None, "stopping after this generation...")

    # --- the search worker ------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="qsearch", exit_on_error=False, description="quantization search")
    def search_job(self, spec: Path | None, run_dir: Path, resume: bool, device: str = "cpu") -> None:
        from workbench.ops.qsearch import open_quant_run
        from workbench.quant.search.run import read_rows

        worker = get_current_worker()
        try:
            apply_threads(self.config.threads)
            search = open_quant_run(spec, run_dir, resume, device=device, progress=lambda ev: self.post_message(
                JobProgress("qsearch", ev.done, ev.total, f"database: {ev.text}")))
            windows, total = search.spec.windows, search.spec.generations + 1

            def on_generation(event) -> None:
                self.post_message(JobProgress("qsearch", event.generation + 1, total,
                                              f"generation {event.generation}: " + "; ".join(
                                                  f"{p['target']:g} bpw: KL {p['fitness']:.4f} at {p['bpw']:.3f}"
                                                  for p in event.targets)))
                self.post_message(QuantGeneration(event, read_rows(run_dir), windows))

            state = search.run(on_generation=on_generation,
                               should_stop=lambda: self.request is not None or worker.is_cancelled)
            reason = self.request if self.request else state["stop_reason"]
            front = None
            if reason != "paused":
                search.write_target_configs()
                self.post_message(JobProgress("qsearch", None, None, "held-out scoring of the front..."))
                front = search.front(lambda _, done, n: self.post_message(
                    JobProgress("qsearch", done, n, f"held-out scoring: {done}/{n}")))
        except Exception as e:  # noqa: BLE001
            self.post_message(JobFailed("qsearch", error_text(e)))
            return
        self.post_message(QuantSearchEnded(run_dir, reason, front))

    @guarded
    def on_job_progress(self, message: JobProgress) -> None:
        if message.job == "qsearch":   # the search's own worker; a point's build is a run_job job
            self.query_one("#qs-job", JobStatus).progress(message.done, message.total, message.text)

    @guarded
    def on_quant_generation(self, message: QuantGeneration) -> None:
        self.query_one("#qs-plot", FrontPlot).show(plot_points(message.rows, message.windows))

    @guarded
    def on_quant_search_ended(self, message: QuantSearchEnded) -> None:
        from workbench.quant.search.run import read_rows

        self.running = False
        job = self.query_one("#qs-job", JobStatus)
        if message.front is None:
            job.finish(f"{message.reason}: resume with Resume (ctrl+n)")
            return
        self.front = front = message.front
        self.query_one("#qs-plot", FrontPlot).show(
            plot_points(read_rows(message.run_dir), _last_windows(message.run_dir), message.front))
        self._fill_table(message.front)
        best = "; ".join(f"{t['target']:g} bpw: held-out ppl {t['searched']['heldout_ppl']:.2f}"
                         + (f" vs {t['best_uniform']['heldout_ppl']:.2f} uniform" if t["best_uniform"] else "")
                         for t in front["targets"])
        job.finish(f"{message.reason}: {len(front['front'])} front points; {best}")
        self.info(f"front written to {message.run_dir / 'pareto.json'}", title="quantization search done")

    def _fill_table(self, front: dict) -> None:
        table = self.query_one("#qs-table", DataTable)
        table.clear()
        for k, p in enumerate(front["front"]):
            table.add_row(p["yml"], f"{p['bpw']:.3f}", f"{p['base_bpw']:.3f}", f"{p['adapter_bpw']:.3f}",
                          f"{p['fitness']:.4f}", f"{p['heldout_kl']:.4f}", f"{p['heldout_ppl']:.2f}",
                          ", ".join(f"{n} {lab}" for lab, n in p["mix"].items()), key=str(k))

    # --- building a point -------------------------------------------------------------------
    def selected_point(self) -> tuple[int, dict] | None:
        if not self.front or not self.front["front"]:
            return None
        row = self.query_one("#qs-table", DataTable).cursor_row
        k = min(max(row, 0), len(self.front["front"]) - 1)
        return k, self.front["front"][k]

    @on(Button.Pressed, "#qs-build")
    @guarded
    def action_build_point(self) -> None:
        if self.job_running("build point"):
            self.warn("a point is being built")
            return
        picked = self.selected_point()
        if picked is None or self.run_dir is None:
            self.error("no front yet: run a quantization search to its end (or Stop it) first")
            return
        k, point = picked
        try:
            minutes = float(self._value("#qs-minutes") or 0)
        except ValueError:
            minutes = -1.0
        if not minutes >= 0:
            self.error("recovery minutes: expected a number >= 0 (0: no recovery)")
            return
        raw = self._value("#qs-out")
        out = Path(raw).expanduser() if raw else self.run_dir / f"point-{k}"
        recovered = out.with_name(out.name + "-recovered") if minutes > 0 else None
        fmt = str(self.query_one("#qs-format", Select).value)
        final = recovered or out
        export = None if fmt == "none" else final.with_name(final.name + ("." + fmt if fmt == "gguf" else f"-{fmt}"))
        outputs = [out, recovered, export, export.with_name(export.stem + ".lora.gguf") if fmt == "gguf" else None]
        overwrite = self.query_one("#qs-overwrite", Checkbox).value
        device = self._device()
        if device is None:
            return

        def start() -> None:
            from workbench.ops.quant import quantize_recover_export

            model, task = Path(self.front["model"]), self.front["heldout_task"]
            self.run_job("build point", lambda progress: quantize_recover_export(
                model, self.run_dir / point["yml"], out, minutes, recovered, fmt, export, eval_task=task,
                overwrite=overwrite, progress=progress, device=device), status="#qs-point-job", buttons=("#qs-build",),
                start_text=f"building {point['yml']} ({point['bpw']:.3f} bpw)...",
                done_text=lambda result: f"built {recovered or out}")

        self.start_if_outputs_free(outputs, overwrite, start)

    def job_finished(self, message: JobFinished) -> None:
        self.built = r = message.result
        self.query_one("#qs-result", Label).update(Text("\n".join(built_lines(r)), style="green"))

    @guarded
    def on_job_failed(self, message: JobFailed) -> None:
        if message.job == "qsearch":   # the search's own worker (a point's build ends in run_job's handler)
            self.running = False
            self.query_one("#qs-job", JobStatus).fail(message.error)
            self.error(message.error, title="quantization search failed")


def built_lines(r: dict) -> list[str]:
    """What quantize_recover_export made, a line per step, with held-out perplexities (the Quantize
    screen shows sizes and paths instead: `result_lines`)."""
    q = r["quantized"]
    lines = [f"{q['out']}: {q['bits_per_weight_with_adapters']:.3f} bits per weight with adapters "
             f"({q['bits_per_weight']:.3f} base), held-out ppl {q['ppl']:.2f}"]
    if r["recovery"] is not None:
        lines.append(f"recovered: held-out ppl {r['recovery']['ppl_before']:.2f} -> {r['recovery']['ppl_after']:.2f}")
    if r["export"] is not None:
        lines.append(f"exported: {r['export']['path']}")
    return lines


def _last_windows(run_dir: Path) -> int:
    import json

    return json.loads((run_dir / "spec.yml").read_text())["stages"][-1]["windows"]
