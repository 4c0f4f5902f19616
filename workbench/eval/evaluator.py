"""``evaluate(model, tokenizer, tasks, ...)``: score an in-memory model on task splits.

Nothing is read from disk per candidate: tasks come in loaded (:func:`load_task`), tokenized
requests are cached per tokenizer, kl teacher outputs are cached in memory after their first
load. Model scores are never cached, so a changed weight can never return a stale score.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.eval import kl as kl_mod
from workbench.eval.generate import generate_and_score
from workbench.eval.lm_eval_tasks import aggregate_lm_eval, score_lm_eval_units
from workbench.eval.metrics import aggregate, multiple_choice_unit, token_mean_metrics
from workbench.eval.racing import BOUNDS, Race, race_order
from workbench.eval.requests import Prepared, Unit, prepare
from workbench.eval.scoring import loglik_reducer, model_max_length, score_requests
from workbench.eval.taskfile import Task, load_task, normalize_text
from workbench.tasks import HELDOUT_PPL_TASK

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ProgressHook(Protocol):
    def start(self, task: str, total: int) -> None: ...
    def advance(self, n: int) -> None: ...


@dataclass
class TaskResult:
    """One task's metrics (``score`` is the fitness in [0, 1]) with standard errors."""

    task: str
    type: str
    split: str
    metrics: dict[str, float]
    stderr: dict[str, float]
    items: int                 # units scored (items; windows for perplexity/kl)
    total_items: int
    seconds: float
    stopped_early: bool = False
    samples: list[dict] = field(default_factory=list)
    tokens: int | None = None  # perplexity/kl: scored tokens
    documents: list[int] | None = None  # lm_eval: the evaluation documents of the split (lm-eval's indices)

    @property
    def score(self) -> float:
        return self.metrics["score"]

    def to_dict(self) -> dict:
        out: dict = {}
        for k, v in self.metrics.items():
            out[k] = _finite(v)
            out[f"{k}_stderr"] = _finite(self.stderr.get(k, math.nan))
        out.update(items=self.items, total_items=self.total_items, seconds=round(self.seconds, 4),
                   stopped_early=self.stopped_early, split=self.split, type=self.type)
        if self.tokens is not None:
            out["tokens"] = self.tokens
        if self.documents is not None:
            out["documents"] = self.documents
        return out


def _finite(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


@dataclass
class _Options:
    batch_size: int
    max_batch_tokens: int
    log_samples: bool
    progress: ProgressHook | None
    race_bound: str = "normal"
    teacher_dtype: str | None = None


def evaluate(model, tokenizer, tasks: Task | str | Path | Sequence[Task | str | Path], *,
             split: str = "search", limit: int | None = None, batch_size: int = 32,
             max_batch_tokens: int = 16384, dtype: str | None = None, threads: int | None = None,
             incumbent: float | dict[str, float] | None = None, confidence: float = 0.95,
             chunk: int | None = None, race_bound: str = "normal", seed: int = 0, progress: ProgressHook | None = None,
             log_samples: bool = False, teacher_dtype: str | None = None) -> dict[str, TaskResult]:
    """Evaluate ``model`` on ``split`` of each task; returns ``{task name: TaskResult}``.

    ``limit``: the first N units (file order). ``dtype``: None runs the model as it is;
    ``"bfloat16"``/``"float16"`` autocast a float32 model; ``"float32"`` requires float32 weights.
    ``incumbent``: a score (or ``{task: score}``) to race against: units go in chunks of
    ``chunk`` (default: a tenth of the split, at least 10) in a seeded order and a candidate
    whose upper confidence bound (at ``confidence``; ``race_bound`` "normal" or "bernstein", see
    :mod:`workbench.eval.racing`) falls below the incumbent stops early. ``teacher_dtype``: a kl
    task's teacher beside a GPU model runs there in this dtype (``kl.teacher_placement``).
    """
    if isinstance(tasks, (Task, str, Path)):
        tasks = [tasks]
    loaded = [t if isinstance(t, Task) else load_task(t) for t in tasks]
    if isinstance(incumbent, (int, float)) and not isinstance(incumbent, bool):
        if len(loaded) != 1:
            raise WorkbenchError("incumbent: give {task: score} when racing several tasks")
        incumbent = {loaded[0].name: float(incumbent)}
    if limit is not None and limit < 1:
        raise WorkbenchError(f"limit: expected a positive number of items, got {limit}")
    if race_bound not in BOUNDS:
        raise WorkbenchError(f"race_bound: {race_bound!r} is not one of {', '.join(BOUNDS)}")
    if chunk is not None and chunk < 1:
        raise WorkbenchError(f"chunk: expected a positive number of items, got {chunk}")
    if not 0 < confidence < 1:
        raise WorkbenchError(f"confidence: expected a probability between 0 and 1, got {confidence}")
    opts = _Options(batch_size, max_batch_tokens, log_samples, progress, race_bound, teacher_dtype)
    was_training = model.training
    old_threads = torch.get_num_threads()
    try:
        model.eval()
        if threads:
            torch.set_num_threads(threads)
        with _compute_context(model, dtype), torch.inference_mode():
            results = {}
            for task in loaded:
                inc = (incumbent or {}).get(task.name)
                results[task.name] = _evaluate_task(model, tokenizer, task, split, limit, inc, confidence,
                                                    chunk, seed, opts)
            return results
    finally:
        model.train(was_training)
        torch.set_num_threads(old_threads)


def _compute_context(model, dtype: str | None):
    if dtype is None:
        return contextlib.nullcontext()
    if dtype not in DTYPES:
        raise WorkbenchError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    param = next(model.parameters())
    if DTYPES[dtype] == param.dtype:
        return contextlib.nullcontext()
    if dtype == "float32":
        raise WorkbenchError(f"dtype: the model's weights are {str(param.dtype).removeprefix('torch.')}; "
                             f"load it in float32 to evaluate in float32")
    return torch.autocast(param.device.type, dtype=DTYPES[dtype])


def _evaluate_task(model, tokenizer, task: Task, split: str, limit: int | None, incumbent: float | None,
                   confidence: float, chunk: int | None, seed: int, opts: _Options) -> TaskResult:
    t0 = time.perf_counter()
    prep = prepare(task, split, tokenizer)
    units = prep.units[:limit] if limit else prep.units
    n = len(units)
    mlen = model_max_length(model)
    if task.type in ("perplexity", "kl") and mlen is not None and task.max_length > mlen:
        raise WorkbenchError(f"{task.path}: max_length: {task.max_length} exceeds the model's context of {mlen}")
    teacher = None
    if task.type == "kl":
        model_device = next(model.parameters()).device
        device, dtype = kl_mod.teacher_placement(model_device, opts.teacher_dtype)
        with torch.autocast(model_device.type, enabled=False):
            teacher = kl_mod.teacher_topk(task, prep, tokenizer, batch_size=opts.batch_size, device=device, dtype=dtype)
    racing = incumbent is not None
    if racing:
        order = race_order(n, seed)
        size = chunk or max(10, math.ceil(n / 10))
    else:
        order, size = list(range(n)), n
    if opts.progress is not None:
        opts.progress.start(task.name, sum(_cost(task, u) for u in units))
    bounded = task.type in ("multiple_choice", "exact_match", "lm_eval")
    total_w = float(sum(len(u.requests[0].continuation) for u in units)) if not bounded else None
    race = Race(n, incumbent, confidence, size, bounded, opts.race_bound, total_weight=total_w)
    records: list[dict] = []
    samples: list[dict] = []
    for start in range(0, n, size):
        part = [units[i] for i in order[start:start + size]]
        recs = _SCORERS[task.type](model, tokenizer, task, prep, part, opts, samples, teacher)
        records += recs
        race.add([r["unit"] for r in recs], [r.get("weight", 1.0) for r in recs])
        if race.should_stop():
            break
    metrics, stderr = _aggregate(task, records)
    tokens = int(sum(r["weight"] for r in records)) if not bounded else None
    documents = sorted(u.line for u in units) if task.type == "lm_eval" else None
    return TaskResult(task.name, task.type, split, metrics, stderr, len(records), n,
                      time.perf_counter() - t0, race.stopped, samples, tokens, documents)


def _score_rides(u: Unit) -> bool:
    """exact_match: the gold answer's context is the prompt, so generation scores it in the prompt's
    prefill instead of a pass of its own."""
    return list(u.requests[0].context) == list(u.prompt)


def _cost(task: Task, u: Unit) -> int:
    if task.type == "lm_eval":
        return len(u.requests) + len(u.generate)
    if task.type == "exact_match":
        return 1 if _score_rides(u) else 2
    return len(u.requests)


def _advance(opts: _Options):
    return opts.progress.advance if opts.progress is not None else None


def _score(model, reqs, opts: _Options, reducer=loglik_reducer):
    return score_requests(model, [(r.context, r.continuation) for r in reqs], batch_size=opts.batch_size,
                          max_batch_tokens=opts.max_batch_tokens, reducer=reducer, progress=_advance(opts))


def _sample(task: Task, u: Unit, r, values) -> dict:
    return {"task": task.name, "item": u.index, "line": u.line, "context": r.context_text,
            "continuation": r.continuation_text, "loglikelihood": float(values[:, 0].sum()),
            "tokens": len(r.continuation), "is_greedy": bool(values[:, 1].all())}


def _score_mc(model, tokenizer, task, prep, part, opts, samples, teacher) -> list[dict]:
    reqs = [r for u in part for r in u.requests]
    vals = iter(_score(model, reqs, opts))
    recs = []
    for u in part:
        v = [next(vals) for _ in u.requests]
        lls = [float(x[:, 0].sum()) for x in v]
        rec = multiple_choice_unit(lls, u.choices, u.gold)
        rec["unit"] = rec["score"]
        recs.append(rec)
        if opts.log_samples:
            for j, (r, x) in enumerate(zip(u.requests, v)):
                samples.append(_sample(task, u, r, x) | {"choice": j, "gold": u.gold, "acc": rec["acc"]})
    return recs


def _score_em(model, tokenizer, task, prep, part, opts, samples, teacher) -> list[dict]:
    rides = [_score_rides(u) for u in part]
    gens, vals = generate_and_score(model, tokenizer, [u.prompt for u in part], task.max_new_tokens, task.stop,
                                    batch_size=opts.batch_size, progress=_advance(opts),
                                    continuations=[u.requests[0].continuation if r else None
                                                   for u, r in zip(part, rides)])
    alone = [u.requests[0] for u, r in zip(part, rides) if not r]
    rest = iter(_score(model, alone, opts) if alone else [])
    vals = [v if r else next(rest) for v, r in zip(vals, rides)]
    recs = []
    for u, g, v in zip(part, gens, vals):
        norm = normalize_text(g, task.normalize)
        exact = float(any(norm == normalize_text(a, task.normalize) for a in u.answers))
        score = math.exp(float(v[:, 0].mean()))
        recs.append({"exact_match": exact, "score": score, "unit": score})
        if opts.log_samples:
            samples.append(_sample(task, u, u.requests[0], v) | {"generation": g, "exact_match": exact})
    return recs


def _window_sample(task, tokenizer, u: Unit, values, name: str) -> dict:
    r = u.requests[0]
    return {"task": task.name, "item": u.doc, "window": u.index, "line": u.line,
            "context": tokenizer.decode(r.context), "continuation": tokenizer.decode(r.continuation),
            "tokens": len(r.continuation), name: float(values.sum())}


def _score_ppl(model, tokenizer, task, prep, part, opts, samples, teacher) -> list[dict]:
    vals = _score(model, [u.requests[0] for u in part], opts)
    recs = []
    for u, v in zip(part, vals):
        nll = -v[:, 0].numpy()
        recs.append({"tokens_nll": nll, "unit": float(nll.mean()), "weight": float(nll.size)})
        if opts.log_samples:
            s = _window_sample(task, tokenizer, u, v[:, 0], "loglikelihood")
            samples.append(s | {"is_greedy": bool(v[:, 1].all())})
    return recs


def _score_kl(model, tokenizer, task, prep: Prepared, part, opts, samples, teacher) -> list[dict]:
    starts = np.cumsum([0] + [len(u.requests[0].continuation) for u in prep.units]).tolist()
    reducer = kl_mod.kl_reducer(teacher, [starts[u.index] for u in part])
    vals = _score(model, [u.requests[0] for u in part], opts, reducer)
    recs = []
    for u, v in zip(part, vals):
        k = v[:, 0].numpy()
        recs.append({"tokens_kl": k, "unit": float(k.mean()), "weight": float(k.size)})
        if opts.log_samples:
            samples.append(_window_sample(task, tokenizer, u, v[:, 0], "kl"))
    return recs


def _score_lm_eval(model, tokenizer, task, prep, part, opts, samples, teacher) -> list[dict]:
    def generate(prompts, max_new_tokens, stop, continuations):
        return generate_and_score(model, tokenizer, prompts, max_new_tokens, stop, batch_size=opts.batch_size,
                                  continuations=continuations, progress=_advance(opts))

    return score_lm_eval_units(task, part, lambda reqs: _score(model, reqs, opts), generate,
                               opts.log_samples, samples)


_SCORERS = {"multiple_choice": _score_mc, "exact_match": _score_em, "perplexity": _score_ppl, "kl": _score_kl,
            "lm_eval": _score_lm_eval}


def _aggregate(task: Task, records: list[dict]) -> tuple[dict, dict]:
    if task.type == "multiple_choice":
        return aggregate(records, ["acc", "acc_norm", "score"])
    if task.type == "exact_match":
        return aggregate(records, ["exact_match", "score"])
    if task.type == "lm_eval":
        return aggregate_lm_eval(task, records)
    name = "nll" if task.type == "perplexity" else "kl"
    per_token = np.concatenate([r[f"tokens_{name}"] for r in records])
    return token_mean_metrics(per_token, name)


def results_to_dict(results: dict[str, TaskResult]) -> dict:
    """``{task: {metric, metric_stderr, ..., items, seconds}}`` (what ``--json`` writes)."""
    return {name: r.to_dict() for name, r in results.items()}


def all_samples(results: dict[str, TaskResult]) -> Iterable[dict]:
    for r in results.values():
        yield from r.samples


def heldout_perplexity(model, tokenizer, task: str = HELDOUT_PPL_TASK) -> float:
    """Perplexity of ``model`` on the ``heldout`` split of a perplexity task."""
    with torch.no_grad():
        (result,) = evaluate(model, tokenizer, task, split="heldout").values()
    return result.metrics["ppl"]


def saved_perplexity(path: str | Path, task: str = HELDOUT_PPL_TASK) -> float:
    """Held-out perplexity of a saved model, loaded as `workbench eval PATH TASK --split heldout` does."""
    from workbench.models.loader import load_model

    model, tok = load_model(path)
    return heldout_perplexity(model, tok, task)
