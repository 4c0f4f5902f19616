"""The evolutionary merge search: CMA-ES ask/tell over genomes, candidates merged in memory.

Run directory::

    spec.yml         the spec as run (with its seed)
    history.jsonl    one row per evaluated candidate (generation, index, kind, genome, recipe,
                     score, per-task scores, items, seconds, merge_seconds, error)
    checkpoint.json  state after the last complete generation (counters, incumbent, numpy's RNG),
                     naming checkpoint-cma-NNNNNN.pickle, pycma's ES, read by a restricted
                     unpickler (see workbench.search.checkpoint; no arbitrary pickle is loaded)
    best.yml         mergekit-compatible recipe of the incumbent
    report.json/.md  the held-out report, at the end

Resuming reads the checkpoint, drops history rows of any generation after it (so a kill -9
mid-generation leaves no duplicates), restores numpy's global RNG (which pycma draws from) and
continues; the result equals an uninterrupted run with the same seed.

pycma pitfalls handled here: fitness is continuous and ``tolfun``/``tolflatfitness`` are off so
a flat start does not stop the run; a failed candidate gets an explicit worst fitness; the mean
(``xfavorite``) is evaluated every generation, since with a noisy fitness it beats ``xbest``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from workbench.atomic import atomic_file, remove_stale_temporaries_in
from workbench.errors import WorkbenchError
from workbench.eval.lm_eval_tasks import check_spec_lm_eval
from workbench.faults import fault_point
from workbench.merge.recipe import Recipe, dump_recipe, recipe_from_dict
from workbench.search.checkpoint import (
    OLD_CHECKPOINT,
    Checkpoint,
    has_checkpoint,
    read_checkpoint,
    require_checkpoint,
    write_checkpoint,
)
from workbench.search.spec import SearchSpec, load_spec, spec_from_dict

WORST = 2.0  # fitness (CMA minimizes -score, score in [0, 1]) given to a candidate that failed


@dataclass
class CandidateDone:
    generation: int
    index: int
    kind: str  # "candidate" or "favorite" (the CMA mean)
    score: float | None
    tasks: dict
    seconds: float
    merge_seconds: float
    error: str | None = None


@dataclass
class GenerationDone:
    generation: int
    best: float
    mean: float
    incumbent: float
    evaluations: int
    elapsed: float
    eta: float | None  # seconds left by the budget, when it can be told


@dataclass
class SearchState:
    generation: int = 0  # generations completed
    evaluations: int = 0
    elapsed: float = 0.0  # seconds of search, summed over resumes
    incumbent: dict | None = None  # the best history row so far
    stop_reason: str | None = None
    history: list[dict] = field(default_factory=list)


def _event(row: dict) -> CandidateDone:
    return CandidateDone(row["generation"], row["index"], row["kind"], row["score"], row["tasks"], row["seconds"],
                         row["merge_seconds"], row["error"])


def write_jsonl_rows(path: Path, rows: list[dict]) -> None:
    """Append rows, each reaching the file whole before the next (a kill leaves whole rows, or one
    cut short: readers drop that one and what follows)."""
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            f.flush()
            fault_point("history:row")
        os.fsync(f.fileno())


def read_jsonl_rows(path: Path) -> list[dict]:
    """The whole rows :func:`write_jsonl_rows` wrote (none when the file is missing)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a row cut short by a kill: it and anything after belong to unfinished work
    return rows


def read_history(run_dir: Path) -> list[dict]:
    return read_jsonl_rows(Path(run_dir) / "history.jsonl")


def _cma_options(spec: SearchSpec) -> dict:
    return {"bounds": [0, 1], "popsize": spec.budget.population, "seed": spec.seed + 1,  # 0 means "time"
            "tolfun": 0, "tolfunhist": 0, "tolflatfitness": 10**9, "tolx": 0, "tolstagnation": 10**9,
            "verbose": -9, "verb_log": 0, "verb_disp": 0, "signals_filename": "", "maxiter": 10**9}


class Search:
    """One search run: set up with :meth:`start` or :meth:`resume`, then :meth:`run`."""

    def __init__(self, spec: SearchSpec, run_dir: str | Path, objective=None, device: str = "cpu",
                 backend: str = "local", workers: int | None = None, address: str = "local"):
        """``backend``: local, processes or ray (see :mod:`workbench.search.backends`: with CUDA, one
        worker per GPU unless ``workers`` is given); the held-out report runs on the same workers."""
        from workbench.merge.plan import plan_merge
        from workbench.search.backends import make_backend
        from workbench.search.genome import GenomeLayout

        spec = resolve_models(spec)
        self.spec = spec
        self.run_dir = Path(run_dir)
        probe = GenomeLayout(spec, 1)
        plan = plan_merge(probe.to_recipe(probe.start()))
        num_layers = plan.num_layers
        plan.close()
        self.layout = GenomeLayout(spec, num_layers)
        self.backend = make_backend(backend, spec, num_layers, objective, device, workers, address)
        self.state = SearchState()
        self.es = None

    @property
    def merger(self):
        """The in-process merger of the local backend (the other backends' mergers live in their workers)."""
        from workbench.search.backends import LocalBackend

        if not isinstance(self.backend, LocalBackend):
            raise WorkbenchError("the search's candidates are merged in its workers; use search.backend.call")
        return self.backend.worker.merger

    # --- set-up ----------------------------------------------------------------------------
    def start(self, again: bool = False) -> "Search":
        """A new run in an empty (or new) directory; ``again``: in a run directory that was killed
        before its first checkpoint (what it wrote is dropped: the run starts at generation 0)."""
        with warnings.catch_warnings():  # pycma warns that matplotlib (for its plots) is missing
            warnings.simplefilter("ignore")
            import cma

        if self.run_dir.is_dir():
            remove_stale_temporaries_in(self.run_dir)   # left by a kill -9: not the user's
        if again:
            for name in ("history.jsonl", "best.yml"):
                (self.run_dir / name).unlink(missing_ok=True)
        elif self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise WorkbenchError(f"{self.run_dir} is not empty; resume it with --resume or choose another --out")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.run_dir / "spec.yml") as f:
            f.write(json.dumps(self.spec.to_dict(), indent=2))
        x0 = self._pad(self.layout.start())
        self.es = cma.CMAEvolutionStrategy(x0, self.spec.sigma0, _cma_options(self.spec))
        return self

    def resume(self) -> "Search":
        ck = read_checkpoint(self.run_dir, _cma_options(self.spec))
        self.es = ck.es
        np.random.set_state(ck.numpy_rng)
        self.state = SearchState(ck.generation, ck.evaluations, ck.elapsed, ck.incumbent, ck.stop_reason)
        remove_stale_temporaries_in(self.run_dir)   # left by a kill -9: not the user's
        rows = [r for r in read_history(self.run_dir) if r["generation"] < self.state.generation]
        with atomic_file(self.run_dir / "history.jsonl") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        self.state.history = rows
        if self.state.incumbent is not None:   # a kill after the checkpoint may have kept an older best.yml
            with atomic_file(self.run_dir / "best.yml") as f:
                f.write(dump_recipe(self.best_recipe()))
        return self

    @staticmethod
    def _pad(x: np.ndarray) -> np.ndarray:
        # pycma needs at least 2 dimensions; a 1-gene genome gets an inert second gene
        return np.append(x, 0.5) if len(x) == 1 else x

    def _genes(self, x) -> np.ndarray:
        return np.asarray(x)[: len(self.layout)]

    # --- the loop --------------------------------------------------------------------------
    def budget_left(self) -> str | None:
        b, s = self.spec.budget, self.state
        if b.generations is not None and s.generation >= b.generations:
            return "generations"
        if b.max_evaluations is not None and s.evaluations >= b.max_evaluations:
            return "max_evaluations"
        if b.max_minutes is not None and s.elapsed >= 60 * b.max_minutes:
            return "max_minutes"
        return None

    def eta(self) -> float | None:
        s, b = self.state, self.spec.budget
        if s.generation == 0:
            return None
        per_gen = s.elapsed / s.generation
        left = [per_gen * (b.generations - s.generation)] if b.generations else []
        if b.max_minutes:
            left.append(60 * b.max_minutes - s.elapsed)
        return max(0.0, min(left)) if left else None

    def run(self, on_candidate: Callable[[CandidateDone], None] | None = None,
            on_generation: Callable[[GenerationDone], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> SearchState:
        while True:
            reason = self.budget_left() or (("cma: " + ",".join(self.es.stop())) if self.es.stop() else None)
            if reason is None and should_stop is not None and should_stop():
                reason = "stopped"
            if reason:
                self.state.stop_reason = reason
                return self.state
            self.step(on_candidate, on_generation, should_stop)

    def step(self, on_candidate=None, on_generation=None, should_stop=None) -> GenerationDone:
        """One generation: ask, evaluate, tell, evaluate the mean, then write history and checkpoint."""
        t0 = time.perf_counter()
        g = self.state.generation
        X = self.es.ask()
        incumbent = self.state.incumbent["score"] if self.state.incumbent else None
        rows = []
        for row in self.backend.map([(self._genes(x).tolist(), g, i, "candidate", incumbent)
                                     for i, x in enumerate(X)]):
            rows.append(row)
            if on_candidate:
                on_candidate(_event(row))
        self.es.tell(X, [-r["score"] if r["score"] is not None else WORST for r in rows])
        favorite = next(self.backend.map([(self._genes(self.es.mean).tolist(), g, len(X), "favorite", incumbent)]))
        rows.append(favorite)
        if on_candidate:
            on_candidate(_event(favorite))
        scores = [r["score"] for r in rows if r["score"] is not None]
        for r in rows:
            if r["score"] is not None and (self.state.incumbent is None or r["score"] > self.state.incumbent["score"]):
                self.state.incumbent = r
        self.state.generation += 1
        self.state.evaluations += len(rows)
        self.state.elapsed += time.perf_counter() - t0
        write_jsonl_rows(self.run_dir / "history.jsonl", rows)
        self.state.history.extend(rows)
        self._checkpoint()
        done = GenerationDone(g, max(scores) if scores else math.nan, float(np.mean(scores)) if scores else math.nan,
                              self.state.incumbent["score"] if self.state.incumbent else math.nan,
                              self.state.evaluations, self.state.elapsed, self.eta())
        if on_generation:
            on_generation(done)
        return done

    def close(self) -> None:
        self.backend.close()

    def _checkpoint(self) -> None:
        s = self.state  # its history lives in history.jsonl
        write_checkpoint(self.run_dir, Checkpoint(s.generation, s.evaluations, s.elapsed, s.incumbent, s.stop_reason,
                                                  np.random.get_state(), self.es))
        fault_point("search:checkpoint")
        if self.state.incumbent is not None:
            with atomic_file(self.run_dir / "best.yml") as f:
                f.write(dump_recipe(self.best_recipe()))

    def best_recipe(self) -> Recipe:
        if self.state.incumbent is None:
            raise WorkbenchError(f"{self.run_dir}: no candidate has been scored yet")
        return recipe_from_dict(self.state.incumbent["recipe"], source=self.spec.source)


def resolve_models(spec: SearchSpec) -> SearchSpec:
    """The spec with every model as an absolute path, so runs resume (and mergekit reads their
    recipes) from anywhere."""
    probe = Recipe(merge_method=spec.merge_method, source=spec.source)
    data = spec.to_dict()
    data["models"] = [str(probe.resolve_model(m)) for m in spec.models]
    if spec.base_model:
        data["base_model"] = str(probe.resolve_model(spec.base_model))
    here = Path(spec.source).parent
    for o in data["objective"]:
        if spec.source != "<spec>" and (here / o["task"]).is_file():
            o["task"] = str((here / o["task"]).absolute())
    data["report_tasks"] = [str((here / t).absolute()) if spec.source != "<spec>" and (here / t).is_file() else t
                            for t in data["report_tasks"]]
    return spec_from_dict(data, source=spec.source)


def open_search(spec_path: str | Path | None, run_dir: str | Path, resume: bool = False, **kwargs) -> Search:
    """A new search from a spec file, or (``resume``) the search in ``run_dir`` from its spec."""
    run_dir = Path(run_dir)
    if resume:
        spec_file = run_dir / "spec.yml"
        if not spec_file.is_file():
            raise WorkbenchError(f"{run_dir}: not a search run directory (no spec.yml)")
        source = json.loads((run_dir / "spec.yml").read_text())
        spec = spec_from_dict(source, source=str(spec_file))
        if not has_checkpoint(run_dir) and not (run_dir / OLD_CHECKPOINT).is_file():
            # killed before its first generation was checkpointed: resuming is starting over
            return Search(spec, run_dir, **kwargs).start(again=True)
        require_checkpoint(run_dir)  # before the models and tasks load
        return Search(spec, run_dir, **kwargs).resume()
    spec = load_spec(spec_path)
    check_spec_lm_eval(spec)   # lm_eval:NAME tasks load (seconds) before the sources do (minutes)
    return Search(spec, run_dir, **kwargs).start()
