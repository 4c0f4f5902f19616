"""The search's fitness: a weighted mean of task ``score``s on their ``search`` splits.

Scores lie in [0, 1] and are continuous (see ``workbench.eval``), so candidates rarely tie.
The held-out split is refused here, before any search starts.

A kl task's teacher runs where the scored model is (:func:`teachers_on_device`): on the CPU it is
loaded in float32 by the evaluator, as for ``workbench eval``; on a GPU worker it is loaded on that
GPU in the search's ``eval_dtype``, and its outputs are cached apart (by device type and dtype), so
a CPU run never reads a GPU teacher's outputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from workbench.eval.evaluator import evaluate
from workbench.eval.taskfile import Task, check_search_objective, load_task
from workbench.search.spec import SearchSpec

SEARCH_SPLIT = "search"
HELDOUT_SPLIT = "heldout"
_TEACHERS: dict[str, dict[str, torch.Tensor]] = {}   # outputs of teachers run by teacher_topk_on


@dataclass
class Fitness:
    score: float  # weighted mean of task scores, higher is better
    tasks: dict[str, dict]  # task -> {"score", "items", "stderr", "stopped_early"}


class Objective:
    def __init__(self, spec: SearchSpec):
        self.spec = spec
        self.tasks: list[Task] = [load_task(o.task, spec.lm_eval) for o in spec.objective]
        self.weights = [o.weight for o in spec.objective]
        for task in self.tasks:
            check_search_objective(task, SEARCH_SPLIT)

    def __call__(self, model, tokenizer, incumbent: float | None = None, split: str = SEARCH_SPLIT) -> Fitness:
        race = {t.name: incumbent for t in self.tasks} if (incumbent is not None and self.spec.racing) else None
        with teachers_on_device(self.tasks, model, tokenizer, split, self.spec.eval_dtype, self.spec.batch_size):
            results = evaluate(model, tokenizer, self.tasks, split=split, limit=self.spec.limit,
                               batch_size=self.spec.batch_size, incumbent=race, seed=self.spec.seed)
        per_task = {name: {"score": r.score, "stderr": r.stderr.get("score"), "items": r.items,
                           "stopped_early": r.stopped_early} for name, r in results.items()}
        total = sum(w * results[t.name].score for w, t in zip(self.weights, self.tasks)) / sum(self.weights)
        return Fitness(total, per_task)


def teacher_placement(model_device: torch.device, eval_dtype: str) -> tuple[torch.device, str] | None:
    """Where and in which dtype a kl teacher runs beside a model on ``model_device``: None on the CPU
    (the evaluator's own float32 teacher, results exactly as ``workbench eval``'s), else that device
    in the search's ``eval_dtype``."""
    if model_device.type == "cpu":
        return None
    return model_device, eval_dtype


def teacher_topk_on(task: Task, prepared, device: torch.device, dtype: str,
                    batch_size: int = 16) -> dict[str, torch.Tensor]:
    """``workbench.eval.kl.teacher_topk`` with the teacher on ``device`` in ``dtype``: from memory, else
    from the disk cache (keyed by the reference's files, the windows, k, the device type and dtype),
    else computed and stored."""
    from workbench.eval import kl

    ref = task.resolve_reference()
    key = kl.cache_key(f"{kl.model_files_hash(ref)}\0{device.type}\0{dtype}", prepared, task.top_k)
    if key in _TEACHERS:
        return _TEACHERS[key]
    path = kl.cache_dir() / f"{key}.safetensors"
    if path.is_file():
        from safetensors.torch import load_file

        _TEACHERS[key] = load_file(path)
        return _TEACHERS[key]
    from safetensors.torch import save

    from workbench.atomic import atomic_file
    from workbench.eval.scoring import score_requests
    from workbench.models.loader import load_model

    teacher, _ = load_model(ref, dtype=dtype)
    teacher.to(device)
    reqs = [(r.context, r.continuation) for u in prepared.units for r in u.requests]
    with torch.inference_mode():
        out = torch.cat(score_requests(teacher, reqs, batch_size=batch_size, reducer=kl.topk_reducer(task.top_k)))
    k = (out.shape[1] - 1) // 2   # the layout of kl.teacher_topk's outputs
    data = {"logprobs": out[:, :k].float().contiguous(), "indices": out[:, k:2 * k].int().contiguous(),
            "tail": out[:, 2 * k].float().contiguous(),
            "vocab": torch.tensor(teacher.get_output_embeddings().weight.shape[0])}
    del teacher
    with atomic_file(path, "wb") as f:
        f.write(save(data))
    _TEACHERS[key] = data
    return data


@contextlib.contextmanager
def teachers_on_device(tasks: list[Task], model, tokenizer, split: str, eval_dtype: str, batch_size: int):
    """While the block runs, the evaluator's kl tasks on ``split`` use teachers placed by
    :func:`teacher_placement` (nothing changes on the CPU). The evaluator reads teacher outputs from
    ``workbench.eval.kl``'s memory, keyed by model and windows only: they are put there for the block
    and the previous entries restored after it, so nothing else in this process sees them."""
    from workbench.eval import kl
    from workbench.eval.requests import prepare

    kl_tasks = [t for t in tasks if t.type == "kl"]
    place = teacher_placement(next(model.parameters()).device, eval_dtype) if kl_tasks else None
    if place is None:
        yield
        return
    device, dtype = place
    placed = {}
    for task in kl_tasks:
        prepared = prepare(task, split, tokenizer)
        key = kl.cache_key(kl.model_files_hash(task.resolve_reference()), prepared, task.top_k)
        placed[key] = teacher_topk_on(task, prepared, device, dtype, batch_size)
    missing = object()
    saved = {k: kl._MEMORY.get(k, missing) for k in placed}
    kl._MEMORY.update(placed)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is missing:
                kl._MEMORY.pop(k, None)
            else:
                kl._MEMORY[k] = v
