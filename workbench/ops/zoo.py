"""Zoo actions: build the default zoo (base model and experts), and its status."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.home import DEFAULT_MODEL_NAME
from workbench.progress import ProgressFn, emit


def build(only: list[str] | None = None, stop_after: int | None = None, threads: int | None = None,
          progress: ProgressFn | None = None, device: str = "auto") -> list[Path]:
    """Prepare the base and train every missing expert (or those in ``only``) on ``device`` (cpu,
    cuda, cuda:N, auto; checked first), each under its lock and resuming from its checkpoint; return
    the built experts' directories. Progress: stage = the expert, done/total = steps, with the loss;
    a finished or skipped expert reports done == total with its text ("built", "trained in N s",
    "stopped at step K")."""
    from workbench.devices import resolve_device

    dev = resolve_device(device)
    from workbench.models.default_model import prepare_default
    from workbench.zoo.build import EXPERTS, _lock, expert_dir, is_built, train_expert, work_dir

    unknown = [n for n in only or [] if n not in EXPERTS]
    if unknown:
        raise WorkbenchError(f"zoo build: unknown expert(s) {', '.join(unknown)}; expected {', '.join(EXPERTS)}")
    emit(progress, DEFAULT_MODEL_NAME, text="preparing the base model")
    base = prepare_default(progress=False)
    out = []
    for spec in EXPERTS.values():
        if only and spec.name not in only:
            continue
        steps = spec.config.steps
        with _lock(spec.name):
            if is_built(spec.name):
                shutil.rmtree(work_dir(spec.name), ignore_errors=True)   # a kill right after the save leaves it
                emit(progress, spec.name, steps, steps, "built")
                out.append(expert_dir(spec.name))
                continue
            t0 = time.time()
            emit(progress, spec.name, 0, steps, f"training ({steps} steps of {spec.config.batch_size})")
            path = train_expert(spec, base, stop_after=stop_after, threads=threads, device=dev,
                                on_step=lambda step, n, loss, name=spec.name: emit(progress, name, step, n,
                                                                                   f"loss {loss:.4f}", loss))
            if path is None:
                emit(progress, spec.name, stop_after, steps, f"stopped at step {stop_after}; run again to resume")
                continue
            emit(progress, spec.name, steps, steps, f"trained in {time.time() - t0:.0f} s: {path}")
            out.append(path)
    return out


def status() -> list[dict]:
    """One row per zoo model: name, role, state (built, partial (K/N steps), missing), path."""
    from workbench.zoo.build import zoo_status

    return zoo_status()
