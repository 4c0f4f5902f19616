"""Search actions: start or resume a search of either kind (merge recipes or quantization configs),
read a quantization run's front. The returned search object is driven by its ``run(...)`` with
per-candidate / per-generation callbacks, by the CLI and the UI alike; ``close()`` frees it."""

from __future__ import annotations

import json
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.progress import ProgressFn


def run_kind(spec: str | Path | None, resume: str | Path | None) -> str:
    """"merge" or "quantization": the spec's kind, or that of the resumed run's spec.yml."""
    from workbench.quant.search.spec import spec_kind

    if resume is not None:
        path = Path(resume) / "spec.yml"
        if not path.is_file():
            raise WorkbenchError(f"{resume}: not a search run directory (no spec.yml)")
        return json.loads(path.read_text()).get("kind", "merge")
    if spec is None:
        raise WorkbenchError("workbench search: give SPEC.yml --out RUN_DIR, or --resume RUN_DIR")
    return spec_kind(spec)


def open_search(spec: str | Path | None = None, out: str | Path | None = None, resume: str | Path | None = None,
                *, device: str = "cpu", backend: str = "local", workers: int | None = None, address: str = "local",
                progress: ProgressFn | None = None, **options):
    """`workbench search SPEC --out RUN` (``spec`` and ``out``) or `--resume RUN` (``resume``): the
    spec is checked, and the run directory (a new one must be empty), before anything loads.
    A merge search returns a :class:`workbench.search.run.Search`; a quantization search a
    :class:`workbench.quant.search.run.QuantSearch` (its layer database built first: Progress stage
    "layer database")."""
    kind = run_kind(spec, resume)
    if resume is None and out is None:
        raise WorkbenchError("workbench search: give SPEC.yml --out RUN_DIR, or --resume RUN_DIR")
    run_dir = Path(resume if resume is not None else out)
    if kind == "quantization":
        if backend != "local":
            raise WorkbenchError(f"workbench search: a quantization search runs in this process (on --device); "
                                 f"--backend {backend} serves merge searches only")
        from workbench.ops.qsearch import open_quant_run

        return open_quant_run(spec, run_dir, resume=resume is not None, device=device, progress=progress, **options)
    from workbench.search.run import open_search as open_merge_search

    search_memory_plan(spec, resume, device=device, backend=backend, workers=workers).check()
    return open_merge_search(spec, run_dir, resume=resume is not None, device=device, backend=backend,
                             workers=workers, address=address, **options)


def search_memory_plan(spec: str | Path | None = None, resume: str | Path | None = None, *, device: str = "cpu",
                       backend: str = "local", workers: int | None = None, free: dict[str, int] | None = None):
    """`workbench search SPEC --plan`: the :class:`workbench.memory_plan.Plan` of a merge search (from
    its spec file, or a resumed run's spec.yml): what each worker holds, on the devices the backend
    gives its workers (local: one, on ``device``; processes: as ``process_devices`` spreads them over
    the GPUs; Ray: one actor per GPU, or ``workers`` on the CPU). Reads the models' headers only;
    `open_search` runs its ``check()`` before anything loads."""
    from collections import Counter

    from workbench.devices import resolve_device
    from workbench.memory_plan import combine_plans, device_name, search_plan
    from workbench.search.backends import CPU_WORKERS, process_devices
    from workbench.search.run import resolve_models
    from workbench.search.spec import load_spec, spec_from_dict

    if run_kind(spec, resume) == "quantization":
        raise WorkbenchError("--plan: memory plans cover merge searches; a quantization search holds one model "
                             "and its layer database")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise WorkbenchError(f"--workers {workers}: expected a positive number of workers")
    dev = device_name(resolve_device(device, option="--device"))
    if resume is not None:
        path = Path(resume) / "spec.yml"
        loaded = spec_from_dict(json.loads(path.read_text()), source=str(path))
    else:
        loaded = load_spec(spec)
    if backend == "processes":
        per_device = Counter(device_name(d) for d in process_devices(device, workers))
    elif backend == "ray":
        per_device = Counter({dev: 1} if dev != "cpu" else {"cpu": workers or CPU_WORKERS})
    else:
        per_device = Counter({dev: 1})
    resolved = resolve_models(loaded)
    plans = [search_plan(resolved, d, n, free=free, runtime=backend != "local") for d, n in per_device.items()]
    return combine_plans(plans)


def front(run_dir: str | Path) -> tuple[dict, dict]:
    """`workbench search --front RUN`: (the run's pareto.json, its recovered.json or {})."""
    from workbench.ops.qsearch import read_recovered
    from workbench.quant.search.run import read_front

    return read_front(run_dir), read_recovered(run_dir)
