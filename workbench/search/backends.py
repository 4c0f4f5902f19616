"""Where candidates are evaluated: in this process, in N worker processes, or on a Ray cluster.

Every backend runs the same :class:`CandidateWorker` (sources loaded once per worker, candidates
merged in memory) and returns results in the order asked, so a search gives the same history on
any backend for the same seed. The held-out report and its grid baseline run on the same workers
(:meth:`Backend.call`), so the driver never loads the sources.

Devices: ``--backend processes`` gives worker i ``cuda:(i mod GPUs)`` when ``--device`` is cuda or
auto with CUDA present (one worker per GPU unless ``--workers`` says otherwise; ``cuda:N`` pins
every worker to GPU N). ``--backend ray`` starts one actor per GPU of the cluster, each taking one
GPU and seeing it as ``cuda:0`` (Ray sets each actor's ``CUDA_VISIBLE_DEVICES``). A worker that
dies (a Ray actor killed, a process that crashed) is replaced and its job run again, once per job.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

import numpy as np

from workbench.errors import WorkbenchError
from workbench.search.spec import SearchSpec

Job = tuple[list[float], int, int, str, "float | None"]  # genes, generation, index, kind, incumbent
CPU_WORKERS = 2  # workers on the CPU when --workers is not given


class CandidateWorker:
    """Holds the sources, the resident model and the objective; turns genes into a history row."""

    def __init__(self, spec: SearchSpec, num_layers: int, objective=None, device: str = "cpu"):
        from workbench.search.candidates import InMemoryMerger
        from workbench.search.genome import GenomeLayout
        from workbench.search.heap import keep_freed_memory

        keep_freed_memory()   # candidates reuse the same large buffers: no page faults per candidate
        self.spec = spec
        self.device = str(device)
        self.layout = GenomeLayout(spec, num_layers)
        self.merger = InMemoryMerger(self.layout.to_recipe(self.layout.start()), device=device, seed=spec.seed,
                                     model_dtype=spec.eval_dtype, sorted_cache=spec.sorted_cache,
                                     offload_sources=spec.offload_sources)
        if objective is None:
            from workbench.search.objective import Objective

            objective = Objective(spec)
        self.objective = objective
        self.quant_cfg = None
        if spec.quantize:
            from workbench.quant.config import load_quant_config

            self.quant_cfg = load_quant_config(spec.quantize)
        self._grid_layout = None
        self._report_tasks: dict[tuple[str, ...], list] = {}

    def where(self) -> dict:
        """This worker's process and device (its devices as this process numbers them)."""
        return {"pid": os.getpid(), "device": self.device}

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

    def score_grid_point(self, genes: list[float]) -> dict:
        """:meth:`score_recipe` of a grid baseline point (``workbench.search.grid``: a global merge)."""
        if self._grid_layout is None:
            from workbench.search.grid import global_layout

            self._grid_layout = global_layout(self.spec, self.layout.num_layers)
        return self.score_recipe(self._grid_layout.to_recipe(np.asarray(genes)))

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
            traceback.print_exc()   # a worker's stderr: a Ray actor's reaches the driver's log
            sys.stderr.flush()
        return {"recipe": recipe.to_dict(), "score": score, "tasks": tasks, "seconds": round(time.perf_counter() - t0, 4),
                "merge_seconds": round(merge_seconds, 4), "error": error}

    def heldout(self, recipe: dict, task_refs: list[str]) -> dict:
        """One entry of the held-out report: ``recipe`` (mergekit form) merged and scored on each task's
        held-out split, ``{"heldout": {task: metrics}}`` (joint mode: also ``heldout_quantized``)."""
        from workbench.eval.evaluator import evaluate
        from workbench.merge.recipe import recipe_from_dict
        from workbench.search.objective import HELDOUT_SPLIT

        key = tuple(task_refs)
        if key not in self._report_tasks:
            from workbench.eval.taskfile import load_task

            self._report_tasks[key] = [load_task(t, self.spec.lm_eval) for t in task_refs]
        tasks = self._report_tasks[key]
        self.merger.apply(recipe_from_dict(recipe, source=self.spec.source))
        models = {"heldout": self.merger.model}
        if self.quant_cfg is not None:  # joint mode: every entry is also scored as it will be deployed
            models["heldout_quantized"] = self.scored_model()
        out = {}
        for name, model in models.items():
            results = evaluate(model, self.merger.tokenizer, tasks, split=HELDOUT_SPLIT, batch_size=self.spec.batch_size,
                               teacher_dtype=self.spec.eval_dtype)
            out[name] = {t: dict(r.metrics) for t, r in results.items()}
        return out


# --- devices -------------------------------------------------------------------------------
def _device_kind(device: str | None, option: str = "--device") -> tuple[str, int | None]:
    """(``cpu``, ``cuda`` or ``auto``; the index of ``cuda:N``), without asking this machine for CUDA
    (a Ray driver need not have the cluster's GPUs)."""
    from workbench.devices import CHOICES

    spec = (device or "auto").strip()
    if spec in ("cpu", "cuda", "auto"):
        return spec, None
    head, _, index = spec.partition(":")
    if head == "cuda" and index.isdigit():
        return "cuda", int(index)
    raise WorkbenchError(f"{option} {spec}: expected {CHOICES}")


def _check_workers(workers: int | None) -> None:
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise WorkbenchError(f"--workers {workers}: expected a positive number of workers")


def process_devices(device: str | None, workers: int | None = None) -> list[str]:
    """The device of each worker process: ``cuda:(i mod GPUs)`` for ``cuda``/``auto`` with CUDA present
    (one worker per GPU by default), every worker on GPU N for ``cuda:N``, else ``cpu``
    (:data:`CPU_WORKERS` by default); ``workers`` sets how many."""
    import torch

    from workbench.devices import resolve_device

    _check_workers(workers)
    dev = resolve_device(device, "--device")
    if dev.type != "cuda":
        return ["cpu"] * (workers or CPU_WORKERS)
    if dev.index is not None:
        return [str(dev)] * (workers or 1)
    count = torch.cuda.device_count()
    return [f"cuda:{i % count}" for i in range(workers or count)]


def ray_plan(device: str | None, workers: int | None, resources: dict) -> tuple[int, int, str]:
    """(actors, GPUs each actor requests, the device inside each actor) for a Ray cluster with
    ``resources`` (``ray.cluster_resources()``): one actor per GPU for ``cuda``/``cuda:N``/``auto``
    when the cluster has GPUs, each taking one and seeing it as ``cuda:0`` (whatever N was given);
    else ``workers`` (:data:`CPU_WORKERS` by default) on the CPU."""
    _check_workers(workers)
    kind, _ = _device_kind(device)
    gpus = int(resources.get("GPU", 0))
    if kind == "cpu" or (kind == "auto" and gpus == 0):
        return workers or CPU_WORKERS, 0, "cpu"
    if gpus == 0:
        raise WorkbenchError(f"--device {device}: the Ray cluster has no GPUs; use --device cpu (or auto)")
    if workers is not None and workers > gpus:
        raise WorkbenchError(f"--workers {workers}: the Ray cluster has {gpus} GPU(s) and each actor takes one; "
                             f"give --workers {gpus} or fewer (or --device cpu)")
    return workers or gpus, 1, "cuda:0"


# --- dispatch ------------------------------------------------------------------------------
def run_in_order(calls: list[tuple[str, tuple]], workers: list, submit: Callable[[object, str, tuple], Future],
                 replace: Callable[[object, BaseException], object | None], what: str) -> Iterator:
    """``calls`` (a method of :class:`CandidateWorker` and its arguments), one at a time per worker,
    results in the order of ``calls``. ``replace(worker, error)`` gives a new worker for one that died
    (None: the error was not a death); ``workers`` is updated in place. A call whose worker died is
    run again once; a second death is one line naming the call."""
    free = deque(workers)
    todo = deque(range(len(calls)))
    running: dict[Future, tuple[object, int]] = {}
    done: dict[int, object] = {}
    retried: set[int] = set()
    following = 0
    while following < len(calls):
        while free and todo:
            w, i = free.popleft(), todo.popleft()
            running[submit(w, *calls[i])] = (w, i)
        finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
        for fut in finished:
            w, i = running.pop(fut)
            try:
                done[i] = fut.result()
                free.append(w)
                continue
            except BaseException as e:  # noqa: BLE001 (a worker's death is told apart below)
                error = e
            new = replace(w, error)
            if new is None:
                raise error
            workers[next(k for k, x in enumerate(workers) if x is w)] = new
            free.append(new)
            if i in retried:
                raise WorkbenchError(f"{what}: a worker died twice running {_call_name(calls[i])}: "
                                     f"{_line(error)}") from None
            retried.add(i)
            todo.appendleft(i)
        while following in done:
            yield done.pop(following)
            following += 1


def _line(error: BaseException, last: bool = False) -> str:
    """The first (or last) line of an error's text, without terminal colours (Ray's have them)."""
    lines = [s.strip() for s in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if s.strip()]
    line = (lines[-1] if last else lines[0]) if lines else type(error).__name__
    return re.sub(r"^(?:\w+\.)+(?=\w+: )", "", line)   # "workbench.errors.SpecError: x" -> "SpecError: x"


def _call_name(call: tuple[str, tuple]) -> str:
    method, args = call
    if method == "evaluate":
        _, generation, index, kind, _ = args[0]
        return f"generation {generation} {kind} {index}"
    return {"heldout": "a held-out report entry", "score_grid_point": "a grid baseline point"}.get(method, method)


class LocalBackend:
    """Candidates one after another in this process."""

    def __init__(self, spec, num_layers, objective=None, device="cpu"):
        from workbench.devices import resolve_device

        self.worker = CandidateWorker(spec, num_layers, objective, str(resolve_device(device)))
        self.devices = [self.worker.device]

    def call(self, method: str, args_list: list[tuple]) -> Iterator:
        for args in args_list:
            yield getattr(self.worker, method)(*args)

    def map(self, jobs: list[Job]) -> Iterator[dict]:
        return self.call("evaluate", [(job,) for job in jobs])

    def close(self) -> None:
        pass


_WORKER: CandidateWorker | None = None


def _init_process(spec, num_layers, objective, device, threads):
    global _WORKER
    import torch

    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))   # what a library puts on "cuda" lands here too
    _WORKER = CandidateWorker(spec, num_layers, objective, device)


def _call_in_process(method: str, args: tuple):
    return getattr(_WORKER, method)(*args)


class ProcessBackend:
    """Worker processes (spawned), each holding the sources once on its own device; torch threads
    split between them."""

    def __init__(self, spec, num_layers, objective=None, device="cpu", workers: int | None = None):
        self.devices = process_devices(device, workers)
        threads = max(1, (os.cpu_count() or 1) // len(self.devices))
        self._args = (spec, num_layers, objective)
        self._threads = threads
        self.pools = [self._start(d) for d in self.devices]

    def _start(self, device: str) -> tuple[ProcessPoolExecutor, str]:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), initializer=_init_process,
                                   initargs=(*self._args, device, self._threads))
        return pool, device

    def _replace(self, worker: tuple[ProcessPoolExecutor, str], error: BaseException):
        if not isinstance(error, BrokenProcessPool):
            return None
        print(f"workbench: a worker process on {worker[1]} died; starting another", file=sys.stderr)
        worker[0].shutdown(wait=False, cancel_futures=True)
        return self._start(worker[1])

    def call(self, method: str, args_list: list[tuple]) -> Iterator:
        return run_in_order([(method, args) for args in args_list], self.pools,
                            lambda worker, m, a: worker[0].submit(_call_in_process, m, a), self._replace,
                            "--backend processes")

    def map(self, jobs: list[Job]) -> Iterator[dict]:
        return self.call("evaluate", [(job,) for job in jobs])

    def close(self) -> None:
        for pool, _ in self.pools:
            pool.shutdown(cancel_futures=True)


class RayBackend:
    """One actor per GPU of a Ray cluster (each takes one), or ``workers`` actors on CPUs; each holds
    the sources once. Actors' output (a failed candidate's traceback) reaches this process's log."""

    def __init__(self, spec, num_layers, objective=None, device="cpu", workers: int | None = None,
                 address: str = "local"):
        try:
            import ray
        except ImportError:
            raise WorkbenchError("--backend ray needs Ray: pip install 'workbench[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            local = address == "local"
            # a local cluster's workers import what this process imports (e.g. a custom objective)
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}} if local else None
            ray.init(address=None if local else address, include_dashboard=False, log_to_driver=True,
                     runtime_env=env)
        count, gpus, actor_device = ray_plan(device, workers, ray.cluster_resources())
        self.devices = [actor_device] * count
        self._actor = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=0)(CandidateWorker)
        self._args = (spec, num_layers, objective, actor_device)
        self.actors = [self._actor.remote(*self._args) for _ in range(count)]

    def _replace(self, actor, error: BaseException):
        if not isinstance(error, self.ray.exceptions.RayActorError):
            return None
        if getattr(error, "actor_init_failed", False):   # a new actor would fail the same way
            raise WorkbenchError(f"--backend ray: a worker could not start: {_line(error, last=True)}") from None
        print(f"workbench: a Ray actor died ({_line(error)}); starting another", file=sys.stderr)
        self.ray.kill(actor)
        return self._actor.remote(*self._args)

    def _submit(self, actor, method: str, args: tuple) -> Future:
        return getattr(actor, method).remote(*args).future()

    def call(self, method: str, args_list: list[tuple]) -> Iterator:
        return _unwrap_ray(run_in_order([(method, args) for args in args_list], self.actors, self._submit,
                                        self._replace, "--backend ray"), self.ray)

    def map(self, jobs: list[Job]) -> Iterator[dict]:
        return self.call("evaluate", [(job,) for job in jobs])

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)


def _unwrap_ray(results: Iterator, ray) -> Iterator:
    """A WorkbenchError raised in an actor is its one line here (Ray wraps it with the traceback)."""
    try:
        yield from results
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, WorkbenchError):
            raise e.cause from None
        raise


def make_backend(name: str, spec, num_layers, objective=None, device="cpu", workers: int | None = None,
                 address: str = "local"):
    """The backend ``name`` (local, processes or ray); ``workers`` None: one per GPU, else
    :data:`CPU_WORKERS` on the CPU."""
    if name == "local":
        return LocalBackend(spec, num_layers, objective, device)
    if name == "processes":
        return ProcessBackend(spec, num_layers, objective, device, workers)
    if name == "ray":
        return RayBackend(spec, num_layers, objective, device, workers, address)
    raise WorkbenchError(f"--backend {name!r}: expected local, processes or ray")
