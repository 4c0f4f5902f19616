"""`workbench quantize`, `workbench recover` and `workbench export`: arguments, progress bars and a
summary around the functions of :mod:`workbench.ops.quant`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from workbench.atomic import atomic_file, check_output
from workbench.errors import WorkbenchError
from workbench.quant.options import RecoverOptions
from workbench.cli.progress import progress_bars
from workbench.ops.quant import EVAL_TASK, EXPORT_FORMATS, export, quantize, recover

SAVE_EVAL_MARGIN = ("the final save and held-out evaluation of OUT come on top (about as long as loading "
                    "and the opening evaluation)")

console = Console(stderr=True)


def _summary(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False)
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _check_json(args: argparse.Namespace) -> None:
    """Refuse an occupied --json file before any work (unless --overwrite)."""
    if args.json and args.json != "-":
        check_output(args.json, args.overwrite, file=True)


def _write_json(path: str | None, report: dict) -> None:
    """The summary as JSON: to stdout for "-" (the table is on stderr), else atomically to the file."""
    if path == "-":
        print(json.dumps(report, default=str))
    elif path:
        with atomic_file(path) as f:
            f.write(json.dumps(report, default=str) + "\n")


def _phase_rows(phases: dict[str, dict]) -> list[tuple[str, str]]:
    """One row per phase: its seconds against its share of the time budget."""
    names = {"load": "loading", "teacher_cache": "teacher top-k cache", "blocks": "block reconstruction",
             "e2e": "end-to-end KL", "save_eval": "save and held-out eval"}
    rows = []
    for phase, p in phases.items():
        share = p.get("share")
        shown = f"{p['seconds']:.1f} s" + ("" if share is None else f" of {share:.1f} s")
        rows.append((f"  {names.get(phase, phase)}", shown + (" (outside the budget)" if phase == "save_eval" else "")))
    return rows


DEVICE_HELP = "where it computes: cpu, cuda, cuda:N, auto (CUDA when present; default: {})"


def _device(args: argparse.Namespace):
    """--device resolved before any work: a bad value is one line naming it."""
    from workbench.devices import resolve_device

    return resolve_device(args.device)


def run_quantize_cli(args: argparse.Namespace) -> int:
    import torch

    device = _device(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    _check_json(args)
    with progress_bars(console, not args.no_progress) as progress:
        report = quantize(args.model, args.config, args.out, None if args.no_eval else args.eval_task,
                          progress, overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite, device=device)
    ppl_float, ppl = report["ppl_float"], report["ppl"]
    _summary(f"quantized {args.model} -> {args.out}", [
        ("layers", str(report["quantized_layers"])),
        ("bits per weight of the linear layers, stored bytes: total (adapters in) / base",
         f"{report['bits_per_weight_with_adapters']:.3f} / {report['bits_per_weight']:.3f}"),
        ("size on disk", _mb(report["disk_bytes"])),
        ("layers without a fused kernel (dequantize + matmul)", _unfused_text(report)),
        ("time", f"{report['seconds']:.1f} s on {report['device']}"),
        (f"held-out perplexity ({args.eval_task}) float -> quantized",
         "skipped" if ppl is None else f"{ppl_float:.2f} -> {ppl:.2f}")])
    _write_json(args.json, report)
    return 0


def run_recover_cli(args: argparse.Namespace) -> int:
    import torch

    device = _device(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    _check_json(args)
    if args.time_budget is not None and not args.time_budget > 0:
        raise WorkbenchError(f"--time-budget: expected minutes > 0, got {args.time_budget:g}")
    opts = RecoverOptions(steps=args.steps, block_steps=args.block_steps, lr=args.lr, block_lr=args.block_lr,
                          scale_lr=args.scale_lr, seq_len=args.seq_len, batch_size=args.batch_size,
                          max_tokens=args.max_tokens, block_tokens=args.block_tokens, top_k=args.top_k, dtype=args.dtype,
                          time_budget=None if args.time_budget is None else args.time_budget * 60,
                          checkpoint_every=args.checkpoint_every,
                          snapshot_every=None if args.snapshot_every is None else args.snapshot_every * 60, seed=args.seed)

    def on_resume(work: Path) -> None:
        if not args.resume:
            console.print(f"[yellow]resuming[/yellow] from {work} (delete it to start over)")

    with progress_bars(console, not args.no_progress) as progress:
        report = recover(args.qdir, args.teacher, args.out, opts, args.corpus,
                         None if args.no_eval else args.eval_task, args.keep_work, progress, on_resume,
                         overwrite=args.overwrite, device=device)
    losses = [json.loads(line) for line in (Path(args.out) / "loss.jsonl").read_text().splitlines()]
    e2e = [r["loss"] for r in losses if r["phase"] == "e2e"]
    total = sum(p["seconds"] for p in report["phases"].values())
    budget = "" if opts.time_budget is None else f", budget {opts.time_budget / 60:g} min + save and eval"
    _summary(f"recovered {args.qdir} -> {args.out}", [
        ("calibration", f"{args.corpus}: {report['calibration_tokens']} tokens"),
        ("time", f"{_duration(total)} on {report['device']} ({report['steps']} end-to-end steps{budget})"),
        *_phase_rows(report["phases"]),
        *_cut_short_rows(report),
        ("end-to-end KL first -> last", f"{e2e[0]:.3f} -> {e2e[-1]:.3f}" if e2e else "-"),
        ("loss curve", _sparkline(e2e)),
        ("bits per weight of the linear layers, stored bytes: total (adapters in) / base",
         f"{report['bits_per_weight_with_adapters']:.3f} / {report['bits_per_weight']:.3f}"),
        (f"held-out perplexity ({args.eval_task}) before -> after",
         "skipped" if report["ppl_after"] is None else f"{report['ppl_before']:.2f} -> {report['ppl_after']:.2f}")])
    _write_json(args.json, report)
    return 0


def _unfused_text(report: dict) -> str:
    from collections import Counter

    unfused = report["unfused_layers"]
    counts = Counter(unfused.values()).most_common()
    return f"{len(unfused)} of {report['quantized_layers']}" + "".join(f", {f}: {n}" for f, n in counts)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _cut_short_rows(report: dict) -> list[tuple[str, str]]:
    """What the time budget left out, if anything."""
    rows = []
    if report["blocks_skipped"]:
        rows.append(("blocks not reconstructed (time budget)", str(report["blocks_skipped"])))
    if report["options"]["steps"] and report["e2e_windows"] < report["windows"]:
        rows.append(("end-to-end windows (teacher cache cut by the time budget)",
                     f"{report['e2e_windows']} of {report['windows']}"))
    return rows


def _sparkline(values: list[float], width: int = 40) -> str:
    if not values:
        return "-"
    bars = "▁▂▃▄▅▆▇█"
    step = max(1, len(values) // width)
    pts = [sum(values[i:i + step]) / len(values[i:i + step]) for i in range(0, len(values), step)]
    lo, hi = min(pts), max(pts)
    return "".join(bars[int((p - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] for p in pts)


def run_export_cli(args: argparse.Namespace) -> int:
    """The report goes to stdout as JSON (for pipes); progress and errors to stderr."""
    device = _device(args)
    with progress_bars(console, transient=True) as progress:
        report = export(args.qdir, args.out, args.format, args.storage, args.ternary_type, args.fallback,
                        overwrite=args.overwrite, progress=progress, device=device)
    print(json.dumps(report, default=str))
    return 0


def add_parsers(sub) -> None:
    q = sub.add_parser("quantize", help="quantize a model's linear layers (ternary, 1-4 bit) with optional LoRA")
    q.add_argument("model", help="float model directory (safetensors)")
    q.add_argument("--config", required=True, help="quantization config YAML (see recipes/ternary.yml, 2bit.yml)")
    q.add_argument("--out", required=True, help="output directory (compressed safetensors)")
    q.add_argument("--eval-task", default=EVAL_TASK, help="perplexity task whose heldout split is reported")
    q.add_argument("--no-eval", action="store_true", help="skip the held-out perplexity before and after")
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--threads", type=int)
    q.add_argument("--json", metavar="FILE", help="write the summary as JSON to FILE (-: stdout)")
    q.add_argument("--overwrite", action="store_true", help="replace OUT (and the --json file) if they exist")
    q.add_argument("--allow-nonfinite", action="store_true", help="quantize even if a weight is NaN or inf")
    q.add_argument("--device", default="auto", help=DEVICE_HELP.format("auto") + "; the model stays on the CPU, "
                   "each weight is solved there")
    q.set_defaults(func=run_quantize_cli)

    r = sub.add_parser("recover", help="train the quantized model's adapters by distillation from the float model")
    r.add_argument("qdir", help="quantized model directory (from `workbench quantize`)")
    r.add_argument("--teacher", required=True, help="the float model directory")
    r.add_argument("--corpus", default="pydoc,licenses",
                   help="calibration text: pydoc, licenses (held-out ones excluded) and/or text files")
    r.add_argument("--out", required=True, help="output directory; work in progress lives in OUT.work")
    d = RecoverOptions()
    r.add_argument("--steps", type=int, default=d.steps, help="end-to-end KL steps")
    r.add_argument("--block-steps", type=int, default=d.block_steps, help="reconstruction steps per block (0: skip)")
    r.add_argument("--lr", type=float, default=d.lr)
    r.add_argument("--block-lr", type=float, default=d.block_lr)
    r.add_argument("--scale-lr", type=float, default=d.scale_lr, help="learning rate of scales/zeros (0: frozen)")
    r.add_argument("--seq-len", type=int, default=d.seq_len)
    r.add_argument("--batch-size", type=int, default=d.batch_size)
    r.add_argument("--max-tokens", type=int, default=d.max_tokens, help="calibration tokens")
    r.add_argument("--block-tokens", type=int, default=d.block_tokens)
    r.add_argument("--top-k", type=int, default=d.top_k, help="teacher log-probs cached per position")
    r.add_argument("--dtype", default=d.dtype, choices=("bfloat16", "float32"), help="autocast dtype for training")
    r.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="minutes for the whole run: loading, teacher top-k cache (fewer windows when its share "
                        "runs out), block and end-to-end phases, each within its share; " + SAVE_EVAL_MARGIN)
    r.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    r.add_argument("--snapshot-every", type=float, help="minutes between adapter snapshots in OUT.work/snapshots")
    r.add_argument("--seed", type=int, default=d.seed)
    r.add_argument("--resume", action="store_true", help="(default when OUT.work holds a checkpoint)")
    r.add_argument("--keep-work", action="store_true", help="keep OUT.work (checkpoint, teacher cache, loss)")
    r.add_argument("--eval-task", default=EVAL_TASK, help="perplexity task whose heldout split is reported")
    r.add_argument("--no-eval", action="store_true")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--threads", type=int)
    r.add_argument("--json", metavar="FILE", help="write the summary as JSON to FILE (-: stdout)")
    r.add_argument("--overwrite", action="store_true", help="replace OUT (and the --json file) if they exist")
    r.add_argument("--device", default="auto", help=DEVICE_HELP.format("auto") + "; student, teacher and its "
                   "top-k cache train there, bfloat16 autocast on its own type with --dtype bfloat16")
    r.set_defaults(func=run_recover_cli)

    e = sub.add_parser("export", help="export a quantized model: safetensors, peft adapter, GGUF or plain HF")
    e.add_argument("qdir", help="quantized model directory")
    e.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    e.add_argument("--out", required=True, help="output directory (a .gguf file for gguf)")
    e.add_argument("--storage", default="packed", choices=("packed", "trits"),
                   help="safetensors: ternary codes at 2 bits (packed) or 1.6 bits (trits)")
    e.add_argument("--ternary-type", default="TQ2_0", choices=("TQ2_0", "TQ1_0"), help="gguf: type of ternary layers")
    e.add_argument("--fallback", default="Q4", choices=("Q4", "F16", "Q8_0"),
                   help="gguf: layers no TQ type holds: Q4 (our values as Q4_0 / Q4_1 blocks where groups are "
                        "multiples of 32, else F16; default), F16 or Q8_0 of the dequantized weight")
    e.add_argument("--overwrite", action="store_true", help="replace OUT (and OUT.lora.gguf for gguf) if they exist")
    e.add_argument("--device", default="cpu", help=DEVICE_HELP.format("cpu") + "; where gguf, hf and peft "
                   "dequantize (and hf merges the adapters)")
    e.set_defaults(func=run_export_cli)
