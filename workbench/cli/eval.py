"""`workbench eval MODEL TASK...` over :func:`workbench.ops.evaluate.evaluate`: a progress bar per task, a table."""

from __future__ import annotations

import math


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.1f}"


def print_table(results, console) -> None:
    from rich.table import Table

    table = Table(title="evaluation")
    for col in ("Task", "Split", "Metric", "Value", "± Stderr", "Items", "Seconds"):
        table.add_column(col, justify="left" if col in ("Task", "Split", "Metric") else "right")
    for name, r in results.items():
        for i, (metric, value) in enumerate(r.metrics.items()):
            first = i == 0
            items = f"{r.items}/{r.total_items}" + (" (stopped)" if r.stopped_early else "")
            if r.tokens is not None:
                items += f" ({r.tokens:,} tokens)"
            table.add_row(name if first else "", r.split if first else "", metric, _fmt(value),
                          _fmt(r.stderr.get(metric)), items if first else "",
                          f"{r.seconds:.1f}" if first else "")
    console.print(table)


def run_eval_cli(args) -> int:
    """`workbench eval`: every task checked before the model loads (in :func:`workbench.ops.evaluate.evaluate`)."""
    from rich.console import Console

    from workbench.cli.progress import progress_bars
    from workbench.devices import resolve_device
    from workbench.eval.lm_eval_tasks import LmEvalOptions
    from workbench.ops.evaluate import evaluate

    device = resolve_device(getattr(args, "device", "auto"))   # a bad --device: one line, before anything loads
    console = Console(stderr=True)
    lm_eval = LmEvalOptions(tuple(str(p) for p in args.include_path), args.lm_eval_seed, args.search_docs,
                            args.heldout_docs, args.num_fewshot, args.chat_template)
    with progress_bars(console, not args.no_progress) as progress:
        results = evaluate(args.model, args.tasks, split=args.split, limit=args.limit, dtype=args.dtype,
                           batch_size=args.batch_size, threads=args.threads, json_out=args.json,
                           log_samples=args.log_samples, overwrite=args.overwrite, progress=progress,
                           lm_eval=lm_eval, device=device)
    print_table(results, console)
    return 0
