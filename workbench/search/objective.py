"""The search's fitness: a weighted mean of task ``score``s on their ``search`` splits.

Scores lie in [0, 1] and are continuous (see ``workbench.eval``), so candidates rarely tie.
The held-out split is refused here, before any search starts.

A kl task's teacher runs where the scored model is (``workbench.eval.kl.teacher_placement``): on
the CPU in float32, as for ``workbench eval``; on a GPU worker on that GPU in the search's
``eval_dtype``, its outputs cached apart (by device type and dtype), so a CPU run never reads a GPU
teacher's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.eval.evaluator import evaluate
from workbench.eval.taskfile import Task, check_search_objective, load_task
from workbench.search.spec import SearchSpec

SEARCH_SPLIT = "search"
HELDOUT_SPLIT = "heldout"


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
        results = evaluate(model, tokenizer, self.tasks, split=split, limit=self.spec.limit, batch_size=self.spec.batch_size,
                           incumbent=race, seed=self.spec.seed, teacher_dtype=self.spec.eval_dtype)
        per_task = {name: {"score": r.score, "stderr": r.stderr.get("score"), "items": r.items,
                           "stopped_early": r.stopped_early} for name, r in results.items()}
        total = sum(w * results[t.name].score for w, t in zip(self.weights, self.tasks)) / sum(self.weights)
        return Fitness(total, per_task)
