"""`workbench eval MODEL_DIR TASK...`: load a model, evaluate, print a table, write JSON/samples."""

from __future__ import annotations

import json
import math
from pathlib import Path

from workbench.errors import WorkbenchError


def resolve_model_dir(model_dir: str | Path) -> Path:
    """A model directory, given as a path or a name in the workbench home, holding safetensors weights."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        from workbench.home import models_dir

        named = models_dir() / str(model_dir)
        if not (named / "config.json").is_file():
            raise WorkbenchError(f"{model_dir}: not a model directory (no config.json); a GGUF file is imported "
                                 "with `workbench models import-gguf`")
        model_dir = named
    if not any(p.name.endswith(".safetensors") for p in model_dir.iterdir()):
        raise WorkbenchError(f"{model_dir}: no .safetensors weights (pickled checkpoints are not read)")
    return model_dir


def load_model(model_dir: str | Path, dtype: str = "float32"):
    """A safetensors model directory as (model, tokenizer); pickled checkpoints are refused."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir(model_dir)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model.eval(), tokenizer


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

    from workbench.atomic import atomic_file
    from workbench.eval.evaluator import evaluate, results_to_dict
    from workbench.eval.taskfile import load_task

    console = Console(stderr=True)
    tasks = [load_task(t) for t in args.tasks]
    for t in tasks:
        t.split_items(args.split)
    if args.limit is not None and args.limit < 1:
        raise WorkbenchError(f"--limit: expected a positive number of items, got {args.limit}")
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
