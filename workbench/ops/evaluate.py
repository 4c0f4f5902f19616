"""The evaluation action: score a model (any reference: float, compressed, GGUF, home name) on tasks."""

from __future__ import annotations

import json
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.progress import ProgressFn, emit


class _ProgressHook:
    """The evaluator's start/advance hook as Progress events: stage = the task, counting requests."""

    def __init__(self, progress: ProgressFn | None):
        self.progress, self.task, self.done, self.total = progress, "", 0, 0

    def start(self, task: str, total: int) -> None:
        self.task, self.done, self.total = task, 0, total
        emit(self.progress, task, 0, total)

    def advance(self, n: int) -> None:
        self.done += n
        emit(self.progress, self.task, self.done, self.total)


def evaluate(model: str | Path, tasks: list[str], *, split: str = "search", limit: int | None = None,
             dtype: str = "float32", batch_size: int = 32, threads: int | None = None,
             json_out: str | Path | None = None, log_samples: str | Path | None = None, overwrite: bool = False,
             progress: ProgressFn | None = None, lm_eval=None, device: str = "auto") -> dict:
    """`workbench eval`: the device, every task and split checked, and the output files refused when
    occupied (unless ``overwrite``), before the model loads; returns {task: TaskResult}; writes the
    metrics to ``json_out`` and one JSON line per scored request to ``log_samples``, each atomically.
    The model is loaded, then moved to ``device`` (cpu, cuda, cuda:N, auto), where it is scored.
    ``lm_eval``: :class:`~workbench.eval.lm_eval_tasks.LmEvalOptions` for ``lm_eval:NAME`` tasks;
    a GGUF model is imported once into the home's cache (its progress reported)."""
    from workbench.devices import resolve_device

    dev = resolve_device(device)
    from workbench.atomic import atomic_file, check_output
    from workbench.eval.evaluator import evaluate as run_tasks
    from workbench.eval.evaluator import results_to_dict
    from workbench.eval.taskfile import load_task
    from workbench.models.loader import load_model

    from workbench.eval.lm_eval_tasks import doc_ids

    loaded = [load_task(t, lm_eval) for t in tasks]
    for t in loaded:
        doc_ids(t, split) if t.type == "lm_eval" else t.split_items(split)
    if limit is not None and limit < 1:
        raise WorkbenchError(f"--limit: expected a positive number of items, got {limit}")
    for out in (json_out, log_samples):
        if out is not None:
            check_output(out, overwrite, file=True)
    net, tokenizer = load_model(model, dtype, progress=progress)
    net.to(dev)
    results = run_tasks(net, tokenizer, loaded, split=split, limit=limit, batch_size=batch_size, threads=threads,
                        log_samples=log_samples is not None, progress=_ProgressHook(progress))
    if json_out is not None:
        with atomic_file(json_out) as f:
            json.dump(results_to_dict(results), f, indent=2)
            f.write("\n")
    if log_samples is not None:
        with atomic_file(log_samples) as f:
            for r in results.values():
                for s in r.samples:
                    f.write(json.dumps(s, ensure_ascii=False) + "\n")
    return results


def heldout_perplexity(model, tokenizer, task: str, device=None) -> float:
    """Held-out perplexity of a loaded model on ``device`` (None: where it is); the model is left on
    ``device``."""
    from workbench.eval.evaluator import heldout_perplexity as measure

    if device is not None:
        model.to(device)
    return measure(model, tokenizer, task)


def saved_perplexity(path: str | Path, task: str, device=None) -> float:
    """Held-out perplexity of a saved model, loaded as `workbench eval PATH TASK --split heldout
    --device DEVICE` loads it (None: on the CPU)."""
    from workbench.models.loader import load_model

    model, tok = load_model(path)
    return heldout_perplexity(model, tok, task, device)
