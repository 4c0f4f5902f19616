"""Run directories of the search: listing, best scores, comparison (reads files only, no models)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.search.checkpoint import OLD_CHECKPOINT, has_checkpoint
from workbench.ops.merge import best_row
from workbench.search.run import read_history


@dataclass
class RunSummary:
    path: Path
    name: str
    method: str
    generations: int  # complete generations in history.jsonl
    budget_generations: int | None
    evaluations: int
    best: float | None
    status: str  # "finished" (report written), "budget spent", "resumable", "old checkpoint", "restartable"
    modified: float


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "spec.yml").is_file()


def read_spec_dict(run_dir: Path) -> dict:
    try:
        data = json.loads((run_dir / "spec.yml").read_text())  # written as JSON (a YAML subset)
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def summarize_run(run_dir: Path) -> RunSummary:
    spec = read_spec_dict(run_dir)
    rows = read_history(run_dir)
    best = best_row(rows)
    generations = len({r["generation"] for r in rows})
    budget = (spec.get("budget") or {}).get("generations")
    if (run_dir / "report.json").is_file():
        status = "finished"
    elif budget is not None and generations >= budget:
        status = "budget spent"
    elif has_checkpoint(run_dir):
        status = "resumable"
    elif (run_dir / OLD_CHECKPOINT).is_file():
        status = "old checkpoint"  # a pickle of an older version: never loaded, not resumable
    else:
        status = "restartable"   # killed before its first checkpoint: --resume starts it over in place
    return RunSummary(run_dir, str(spec.get("name", run_dir.name)), str(spec.get("merge_method", "?")),
                      generations, budget, len(rows), best["score"] if best else None, status,
                      (run_dir / "spec.yml").stat().st_mtime)


def list_runs(root: Path) -> list[RunSummary]:
    """Every run directory directly under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [summarize_run(d) for d in root.iterdir() if is_run_dir(d)]
    return sorted(runs, key=lambda r: -r.modified)


def generation_stats(rows: list[dict]) -> list[tuple[int, float, float]]:
    """(generation, best, mean) of the scored rows of each generation, in order."""
    by_gen: dict[int, list[float]] = {}
    for r in rows:
        if r.get("score") is not None:
            by_gen.setdefault(r["generation"], []).append(r["score"])
    return [(g, max(v), sum(v) / len(v)) for g, v in sorted(by_gen.items())]


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def compare_runs(a: Path, b: Path) -> tuple[list[str], list[list[str]]]:
    """A table of two runs' best candidates: overall search score, per-task search scores, and the
    held-out scores of their report (when the run finished). Returns (header, rows)."""
    cols = ["", Path(a).name, Path(b).name]
    bests, reports = [], []
    for run in (a, b):
        rows = read_history(run)
        if not rows:
            raise WorkbenchError(f"{run}: no history.jsonl rows to compare")
        bests.append(best_row(rows))
        try:
            reports.append(json.loads((Path(run) / "report.json").read_text()))
        except (OSError, json.JSONDecodeError):
            reports.append(None)
    table = [["search score", *(_fmt(b["score"]) if b else "-" for b in bests)],
             ["generation of best", *(str(b["generation"]) if b else "-" for b in bests)]]
    tasks = list(dict.fromkeys(t for b in bests if b for t in (b.get("tasks") or {})))
    for t in tasks:
        table.append([f"{t} (search)", *(_fmt(((b or {}).get("tasks") or {}).get(t, {}).get("score"))
                                           for b in bests)])
    held = list(dict.fromkeys(t for r in reports if r for t in r.get("tasks", [])))
    for t in held:
        cells = []
        for r in reports:
            entry = next((e for e in (r or {}).get("entries", []) if e["name"].startswith("search #1")), None)
            metrics = (entry or {}).get("heldout", {}).get(t)
            if metrics:
                from workbench.search.report import main_metric

                name, value = main_metric(metrics)
                cells.append(f"{_fmt(value)} {name}")
            else:
                cells.append("-")
        table.append([f"{t} (held-out)", *cells])
    return cols, table
