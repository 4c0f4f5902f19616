"""`workbench eval MODEL_DIR TASK...`: load a model, evaluate, print a table, write JSON/samples."""

from __future__ import annotations

import json
import math
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.models.loader import load_model


class RichProgress:
    """A :class:`ProgressHook` over a rich progress bar (one bar per task, counting requests)."""

    def __init__(self, progress):
        self.progress, self.task_id = progress, None

    def start(self, task: str, total: int) -> None:
        self.task_id = self.progress.add_task(task, total=total)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task_id, n)


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
    """Run `workbench eval`: validate every task before loading the model, then evaluate."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from workbench.atomic import atomic_file, check_output
    from workbench.eval.evaluator import evaluate, results_to_dict
    from workbench.eval.taskfile import load_task

    console = Console(stderr=True)
    tasks = [load_task(t) for t in args.tasks]
    for t in tasks:
        t.split_items(args.split)
    if args.limit is not None and args.limit < 1:
        raise WorkbenchError(f"--limit: expected a positive number of items, got {args.limit}")
    for out in (args.json, args.log_samples):
        if out is not None:
            check_output(out, getattr(args, "overwrite", False), file=True)
    model, tokenizer = load_model(args.model, args.dtype)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, disable=args.no_progress) as progress:
        results = evaluate(model, tokenizer, tasks, split=args.split, limit=args.limit,
                           batch_size=args.batch_size, threads=args.threads,
                           log_samples=args.log_samples is not None, progress=RichProgress(progress))
    print_table(results, console)
    if args.json is not None:
        with atomic_file(args.json) as f:
            json.dump(results_to_dict(results), f, indent=2)
            f.write("\n")
    if args.log_samples is not None:
        with atomic_file(args.log_samples) as f:
            for r in results.values():
                for s in r.samples:
                    f.write(json.dumps(s, ensure_ascii=False) + "\n")
    return 0
