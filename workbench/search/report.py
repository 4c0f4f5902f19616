"""The held-out report at the end of a search: the best candidates against their ingredients.

Every entry is merged in memory and scored on each report task's ``heldout`` split: the top
candidates of the search, each source model alone, the base, and the plain merges a person
would try first (a linear 50/50 of the sources and, with a base, TIES at density 0.5). The gap
between a candidate's search score and its held-out scores shows how much the search overfit;
the grid's best point (``workbench.search.grid``: global parameters in steps of 0.1, as many
evaluations as the search made) shows what per-layer evolution adds over a well-tuned global merge.

Entries and grid points are scored on the search's own workers (``search.backend``: this process,
its worker processes or its Ray actors, on their devices), in parallel; the driver loads no model.
"""

from __future__ import annotations

import json
from pathlib import Path

from workbench.atomic import atomic_file
from workbench.eval.taskfile import load_task
from workbench.merge.methods import METHODS

HELDOUT = "heldout"


def baseline_recipes(search) -> dict[str, dict]:
    """Recipes (mergekit form) for the base, each source alone, and the plain linear / TIES merges."""
    spec, sources = search.spec, search.layout.sources
    out: dict[str, dict] = {}
    if spec.base_model:
        out["base"] = {"merge_method": "linear", "models": [{"model": spec.base_model, "parameters": {"weight": 1.0}}]}
    for src in sources:
        out[Path(src).name] = {"merge_method": "linear", "models": [{"model": src, "parameters": {"weight": 1.0}}]}
    if len(sources) > 1:
        w = round(1.0 / len(sources), 6)
        out["linear (equal weights)"] = {"merge_method": "linear",
                                         "models": [{"model": s, "parameters": {"weight": w}} for s in sources]}
        if spec.base_model and METHODS[spec.merge_method].base != "none":
            out["ties (density 0.5)"] = {"merge_method": "ties", "base_model": spec.base_model,
                                         "models": [{"model": s, "parameters": {"weight": w, "density": 0.5}}
                                                    for s in sources]}
    return out


def top_candidates(history: list[dict], k: int) -> list[dict]:
    seen, top = set(), []
    for row in sorted((r for r in history if r["score"] is not None), key=lambda r: -r["score"]):
        key = tuple(row["genome"])
        if key not in seen:
            seen.add(key)
            top.append(row)
        if len(top) == k:
            break
    return top


def score_grid(search, on_grid=None) -> dict:
    """The grid baseline (:mod:`workbench.search.grid`) scored on the search's workers: as many points
    as the run evaluated, each row written to ``grid.jsonl`` as it comes (in order), the rows already
    there taken as they are. Returns ``{"points", "evaluated", "seed", "step", "best"}``."""
    from workbench.search.grid import GRID_FILE, STEP, global_layout, grid_points, point_genes, point_label, read_grid
    from workbench.search.run import write_jsonl_rows

    spec = search.spec
    n = sum(1 for r in search.state.history if r["kind"] in ("candidate", "favorite"))
    layout = global_layout(spec, search.layout.num_layers)
    points, total = grid_points(spec, layout.sources, n)
    done = {tuple(r["genome"]): r for r in read_grid(search.run_dir)}
    genes = [point_genes(layout, point) for point in points]
    todo = [i for i, g in enumerate(genes) if tuple(g) not in done]
    scored = search.backend.call("score_grid_point", [(genes[i],) for i in todo])
    rows = []
    for i, point in enumerate(points):
        row = done.get(tuple(genes[i]))
        if row is None:
            row = {"index": i, "kind": "grid", "genome": genes[i], "point": point_label(point), **next(scored)}
            write_jsonl_rows(search.run_dir / GRID_FILE, [row])
        rows.append(row)
        if on_grid:
            on_grid(i + 1, len(points), row)
    ok = [r for r in rows if r["score"] is not None]
    best = max(ok, key=lambda r: r["score"]) if ok else None
    return {"points": total, "evaluated": len(rows), "seed": spec.seed, "step": STEP, "best": best}


def heldout_report(search, top: int = 3, on_entry=None, on_grid=None) -> dict:
    """Score the entries on every report task's held-out split; write report.json and report.md.

    With ``spec.grid_baseline`` the grid over the method's global parameters is scored first, on
    the search split for as many evaluations as the run made (``on_grid(done, total, row)``), and
    its best point joins the entries (see :mod:`workbench.search.grid`). Every entry is merged and
    scored by the search's workers (``CandidateWorker.heldout``), in parallel."""
    spec = search.spec
    task_refs = list(dict.fromkeys([o.task for o in spec.objective] + list(spec.report_tasks)))
    tasks = [load_task(t, spec.lm_eval) for t in task_refs]   # their names, and lm-eval's splits
    entries: list[tuple[str, dict, float | None]] = []
    for i, row in enumerate(top_candidates(search.state.history, top)):
        entries.append((f"search #{i + 1} (gen {row['generation']})", row["recipe"], row["score"]))
    grid = None
    if spec.grid_baseline:
        grid = score_grid(search, on_grid)
        if grid["best"] is not None:
            entries.append((f"grid best ({grid['evaluated']} of {grid['points']} points)", grid["best"]["recipe"],
                            grid["best"]["score"]))
            grid["best"] = {"point": grid["best"]["point"], "score": grid["best"]["score"]}
    entries += [(name, recipe, None) for name, recipe in baseline_recipes(search).items()]
    rows = []
    scored = search.backend.call("heldout", [(recipe_dict, task_refs) for _, recipe_dict, _ in entries])
    for (name, recipe_dict, search_score), result in zip(entries, scored):
        row = {"name": name, "search_score": search_score, "recipe": recipe_dict, **result}
        rows.append(row)
        if on_entry:
            on_entry(row)
    report = {"tasks": [t.name for t in tasks], "entries": rows, "quantize": spec.quantize, "grid": grid}
    lm_tasks = [t for t in tasks if t.type == "lm_eval"]
    if lm_tasks:  # which documents each split holds, and the seed that cut them
        from workbench.eval.lm_eval_tasks import doc_ids

        report["lm_eval_splits"] = {t.name: {"seed": spec.lm_eval.seed, "search": doc_ids(t, "search"),
                                             HELDOUT: doc_ids(t, HELDOUT)} for t in lm_tasks}
    with atomic_file(search.run_dir / "report.json") as f:
        f.write(json.dumps(report, indent=2))
    with atomic_file(search.run_dir / "report.md") as f:
        f.write(report_markdown(report))
    return report


def main_metric(metrics: dict) -> tuple[str, float]:
    """The metric a table shows for a task: acc, exact_match (an lm-eval task's ``exact_match,FILTER``
    too), ppl or kl, else the continuous score."""
    for name in ("acc", "exact_match", "ppl", "kl"):
        for key in metrics:
            if key == name or key.startswith(name + ","):
                return key, metrics[key]
    return "score", metrics["score"]


def report_markdown(report: dict) -> str:
    tasks = report["tasks"]
    quantized = bool(report.get("quantize"))
    cols = [f"{t} (held-out)" for t in tasks] + ([f"{t} (held-out, quantized)" for t in tasks] if quantized else [])
    head = "| model | search score | " + " | ".join(cols) + " |"
    lines = [head, "|" + " --- |" * (len(cols) + 2)]
    for row in report["entries"]:
        cells = []
        for key in ("heldout", "heldout_quantized") if quantized else ("heldout",):
            for t in tasks:
                name, value = main_metric(row[key][t])
                cells.append(f"{value:.3f} {name}" if value is not None else "n/a")
        s = f"{row['search_score']:.3f}" if row["search_score"] is not None else ""
        lines.append(f"| {row['name']} | {s} | " + " | ".join(cells) + " |")
    grid = report.get("grid")
    if grid and grid.get("best"):
        lines.append(f"\ngrid baseline: {grid['evaluated']} of {grid['points']} points (steps of {grid['step']}, "
                     f"seed {grid['seed']}) on the search split; best {grid['best']['score']:.3f} at "
                     + ", ".join(f"{k}={v}" for k, v in grid["best"]["point"].items()))
    return "\n".join(lines) + "\n"
