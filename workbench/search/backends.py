"""Where candidates are evaluated: in this process, in N worker processes, or on a Ray cluster.

Every backend runs the same :class:`CandidateWorker` (sources loaded once per worker, candidates
merged in memory) and returns rows in the order asked, so a search gives the same history on
any backend for the same seed.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

from workbench.errors import WorkbenchError
from workbench.search.spec import SearchSpec

Job = tuple[list[float], int, int, str, "float | None"]  # genes, generation, index, kind, incumbent


class CandidateWorker:
    """Holds the sources, the resident model and the objective; turns genes into a history row."""

    def __init__(self, spec: SearchSpec, num_layers: int, objective=None, device: str = "cpu"):
        from workbench.search.candidates import InMemoryMerger
        from workbench.search.genome import GenomeLayout
        from workbench.search.heap import keep_freed_memory

        keep_freed_memory()   # candidates reuse the same large buffers: no page faults per candidate
        self.layout = GenomeLayout(spec, num_layers)
        self.merger = InMemoryMerger(self.layout.to_recipe(self.layout.start()), device=device, seed=spec.seed,
                                     model_dtype=spec.eval_dtype)
        if objective is None:
            from workbench.search.objective import Objective

            objective = Objective(spec)
        self.objective = objective
        self.quant_cfg = None
        if spec.quantize:
            from workbench.quant.config import load_quant_config

            self.quant_cfg = load_quant_config(spec.quantize)

    def scored_model(self):
        """The resident merge, or (joint mode) a quantized copy of it."""
        if self.quant_cfg is None:
            return self.merger.model
        from workbench.quant.model import quantized_copy

        return quantized_copy(self.merger.model, self.quant_cfg)

    def evaluate(self, job: Job) -> dict:
        genes, generation, index, kind, incumbent = job
        return {"generation": generation, "index": index, "kind": kind,
                "genome": [round(float(g), 8) for g in genes],
                **self.score_recipe(self.layout.to_recipe(np.asarray(genes)), incumbent)}

    def score_recipe(self, recipe, incumbent: float | None = None) -> dict:
        """Merge ``recipe`` into the resident model and score it: ``recipe``, ``score`` (None when the
        candidate failed, with the ``error``), ``tasks``, ``seconds``, ``merge_seconds``."""
        t0 = time.perf_counter()
        merge_seconds, score, tasks, error = 0.0, None, {}, None
        try:
            merge_seconds = self.merger.apply(recipe).seconds
            fitness = self.objective(self.scored_model(), self.merger.tokenizer, incumbent=incumbent)
            score, tasks = float(fitness.score), fitness.tasks
            if not math.isfinite(score):
                raise ValueError(f"non-finite score {score}")
        except Exception as e:  # a failed candidate is recorded and scored worst; the run goes on
            error = f"{type(e).__name__}: {e}"
            score = None
            traceback.print_exc()
        return {"recipe": recipe.to_dict(), "score": score, "tasks": tasks, "seconds": round(time.perf_counter() - t0, 4),
                "merge_seconds": round(merge_seconds, 4), "error": error}


class LocalBackend:
    """Candidates one after another in this process."""

    def __init__(self, spec, num_layers, objective=None, device="cpu"):
        self.worker = CandidateWorker(spec, num_layers, objective, device)

    def map(self, jobs: list[Job]):
        for job in jobs:
            yield self.worker.evaluate(job)

    def close(self) -> None:
        pass


_WORKER: CandidateWorker | None = None


def _init_process(spec, num_layers, objective, device, threads):
    global _WORKER
    import torch

    torch.set_num_threads(threads)
    _WORKER = CandidateWorker(spec, num_layers, objective, device)


def _evaluate_in_process(job: Job) -> dict:
    return _WORKER.evaluate(job)


class ProcessBackend:
    """N worker processes, each holding the sources once; torch threads split between them."""

    def __init__(self, spec, num_layers, objective=None, device="cpu", workers: int = 2):
        threads = max(1, (os.cpu_count() or 1) // workers)
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                        initializer=_init_process,
                                        initargs=(spec, num_layers, objective, device, threads))

    def map(self, jobs: list[Job]):
        yield from self.pool.map(_evaluate_in_process, jobs)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class RayBackend:
    """One actor per CPU slot (or GPU) of a Ray cluster, each holding the sources once."""

    def __init__(self, spec, num_layers, objective=None, device="cpu", workers: int = 2, address: str = "local"):
        try:
            import ray
        except ImportError:
            raise WorkbenchError("--backend ray needs Ray: pip install 'workbench[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            local = address == "local"
            # a local cluster's workers import what this process imports (e.g. a custom objective)
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}} if local else None
            ray.init(address=None if local else address, include_dashboard=False, log_to_driver=False,
                     runtime_env=env)
        gpus = 1 if device.startswith("cuda") else 0
        actor = ray.remote(num_cpus=1, num_gpus=gpus)(CandidateWorker)
        self.actors = [actor.remote(spec, num_layers, objective, device) for _ in range(workers)]
        self.pool = ray.util.ActorPool(self.actors)

    def map(self, jobs: list[Job]):
        yield from self.pool.map(lambda a, job: a.evaluate.remote(job), jobs)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


def make_backend(name: str, spec, num_layers, objective=None, device="cpu", workers: int = 2,
                 address: str = "local"):
    if name == "local":
        return LocalBackend(spec, num_layers, objective, device)
    if name == "processes":
        return ProcessBackend(spec, num_layers, objective, device, workers)
    if name == "ray":
        return RayBackend(spec, num_layers, objective, device, workers, address)
    raise WorkbenchError(f"--backend {name!r}: expected local, processes or ray")
