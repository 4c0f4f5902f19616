"""Quantization search actions: recover chosen configs of a run, and the front after recovery beside the one before.

`recover_points(RUN, names, minutes)` builds each named config of the run (``point-K``, ``best-T``
or ``uniform-LABEL``: the YAML files the run wrote), recovers it with the same time budget, and
measures it on the held-out text as the search's front was measured (KL to the float model on the
held-out windows, perplexity on the held-out task). ``targets`` stands for every target's searched
config and its best uniform config: the comparison "searched vs uniform after the same recovery".
Results go to ``RUN/recovered.json`` (one entry per config, replaced when recovered again); the
models stay in ``RUN/points/NAME`` (quantized) and ``RUN/points/NAME-recovered``.

`open_quant_run(SPEC, RUN, device=...)` starts or resumes the search itself on a device.
"""

from __future__ import annotations

import json
from pathlib import Path

from workbench.atomic import atomic_file
from workbench.errors import WorkbenchError
from workbench.progress import Progress, ProgressFn, emit


def open_quant_run(spec: str | Path | None, run_dir: str | Path, resume: bool = False, *, device: str = "cpu",
                   progress: ProgressFn | None = None, **options):
    """`workbench search SPEC --out RUN` (or `--resume RUN`) of a quantization spec on `device`
    (cpu, cuda, cuda:N, auto; checked before the spec and anything else): the layer database is
    solved and candidates are scored there. Progress stage "layer database"."""
    from workbench.devices import resolve_device
    from workbench.quant.search.run import open_quant_search

    dev = resolve_device(device)
    return open_quant_search(spec, run_dir, resume=resume, device=dev, **options,
                             progress=lambda label, done, total: emit(progress, "layer database", done, total, label))


def point_names(run_dir: Path, names: list[str]) -> list[str]:
    """The config names to recover, each checked to exist; ``targets`` expands to every target's
    searched and best uniform configs (from pareto.json)."""
    from workbench.quant.search.run import read_front

    out: list[str] = []
    for name in names:
        if name == "targets":
            for t in read_front(run_dir)["targets"]:
                out += [t["searched"]["yml"]] + ([t["best_uniform"]["yml"]] if t["best_uniform"] else [])
        else:
            out.append(name if name.endswith(".yml") else name + ".yml")
    missing = [n for n in out if not (run_dir / n).is_file()]
    if missing:
        have = sorted(p.name for p in run_dir.glob("*.yml") if p.name != "spec.yml")
        raise WorkbenchError(f"{run_dir}: no config {', '.join(missing)}; the run has {', '.join(have) or 'none'}")
    return list(dict.fromkeys(out))


def recover_points(run_dir: str | Path, names: list[str], minutes: float, overwrite: bool = False,
                   progress: ProgressFn | None = None, device: str = "cpu") -> list[dict]:
    """`workbench search --recover RUN`: quantize, recover (`minutes` each) and measure every named
    config on `device`; returns the entries written to recovered.json. Progress stages are
    "CONFIG: step"."""
    import numpy as np

    from workbench.devices import resolve_device

    dev = resolve_device(device)
    from workbench.models.loader import load_model
    from workbench.ops.quant import quantize_recover_export
    from workbench.quant.recover import teacher_topk
    from workbench.quant.search.run import TOP_K, heldout_windows, window_kls
    from workbench.quant.search.spec import quant_search_spec_from_dict

    run_dir = Path(run_dir)
    if not minutes > 0:
        raise WorkbenchError(f"--time-budget: expected a positive number of minutes, got {minutes}")
    spec = quant_search_spec_from_dict(json.loads((run_dir / "spec.yml").read_text()), str(run_dir / "spec.yml"))
    todo = point_names(run_dir, names)
    teacher, tok = load_model(spec.model)
    windows = heldout_windows(tok, spec)  # the front's held-out windows: before/after compare with it
    cache = teacher_topk(teacher.to(dev), windows, TOP_K, 4)
    del teacher
    path = run_dir / "recovered.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    entries = []
    for name in todo:
        stem = name.removesuffix(".yml")
        qdir, rdir = run_dir / "points" / stem, run_dir / "points" / f"{stem}-recovered"

        def on_progress(p: Progress, _stem=stem) -> None:
            emit(progress, f"{_stem}: {p.stage}", p.done, p.total, p.text, p.loss)

        built = quantize_recover_export(spec.model, run_dir / name, qdir, minutes, rdir,
                                        eval_task=spec.heldout_task, overwrite=overwrite, progress=on_progress,
                                        device=dev)
        q, r = built["quantized"], built["recovery"]
        kls = {}
        for key, d in (("kl_before", qdir), ("kl_after", rdir)):
            model, _ = load_model(d)
            kls[key] = float(np.mean(window_kls(model.to(dev), windows, cache)))
        entry = {"config": name, "minutes": minutes, "bpw": q["bits_per_weight_with_adapters"],
                 "base_bpw": q["bits_per_weight"], "adapter_bpw": q["bits_per_weight_with_adapters"] - q["bits_per_weight"],
                 "ppl_before": q["ppl"], "ppl_after": r["ppl_after"], **kls, "steps": r["steps"],
                 "seconds": r["seconds"], "quantized": str(qdir), "recovered": str(rdir)}
        done[stem] = entry
        entries.append(entry)
        with atomic_file(path) as f:
            f.write(json.dumps(done, indent=2) + "\n")
    return entries


def read_recovered(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "recovered.json"
    return json.loads(path.read_text()) if path.is_file() else {}
