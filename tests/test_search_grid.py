"""The grid baseline of the held-out report: global parameters in steps of 0.1, at the search's cost."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from conftest import write_tiny_task
from workbench.search.grid import global_layout, grid_axes, grid_points, point_genes
from workbench.search.spec import spec_from_dict


def _spec(models, **extra):
    d = {"models": [str(m) for m in models], "merge_method": "ties", "base_model": str(models[0]),
         "evolve": {"weight": [0.0, 1.0], "density": [0.15, 0.62]}, "objective": [{"task": "zoo-arith"}],
         "granularity": "per_layer", "split_attention_mlp": True, "seed": 4}
    d.update(extra)
    return spec_from_dict(d)


def test_axes_points_and_genes():
    spec = _spec(["/b", "/x", "/y"])
    axes = grid_axes(spec, ["/x", "/y"])
    assert [(p, m) for p, m, _ in axes] == [("weight", "/x"), ("weight", "/y"), ("density", "/x"), ("density", "/y")]
    assert axes[0][2] == [round(0.1 * k, 6) for k in range(11)]
    assert axes[2][2] == [0.2, 0.3, 0.4, 0.5, 0.6]       # bounds rounded inward to the grid
    points, total = grid_points(spec, ["/x", "/y"], 10**6)
    assert total == 11 * 11 * 5 * 5 == len(points)
    assert len({tuple(sorted(p.items())) for p in points}) == total          # every point once
    sample, _ = grid_points(spec, ["/x", "/y"], 40)
    again, _ = grid_points(spec, ["/x", "/y"], 40)
    other, _ = grid_points(_spec(["/b", "/x", "/y"], seed=5), ["/x", "/y"], 40)
    assert sample == again != other and len({tuple(sorted(p.items())) for p in sample}) == 40
    assert all(tuple(sorted(p.items())) in {tuple(sorted(q.items())) for q in points} for p in sample)
    # a point is a global merge: one value per model and parameter, whatever the spec's granularity
    layout = global_layout(spec, 4)
    recipe = layout.to_recipe(np.array(point_genes(layout, sample[0]))).to_dict()
    for entry in recipe["models"]:
        m = entry["model"]
        assert entry["parameters"]["weight"] == pytest.approx(sample[0][("weight", m)])
        assert entry["parameters"]["density"] == pytest.approx(sample[0][("density", m)])


def test_report_scores_the_grid_at_the_search_cost_and_resumes(tiny_models, tmp_path):
    from workbench.cli import main
    from workbench.search.grid import read_grid
    from workbench.search.run import read_history

    base, a, b = tiny_models("llama", 3)
    task = write_tiny_task(tmp_path / "tiny.yml")
    spec = {"name": "g", "base_model": str(base), "models": [str(a), str(b)], "merge_method": "ties",
            "evolve": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}, "fixed": {"normalize": True},
            "objective": [{"task": str(task)}], "budget": {"generations": 2, "population": 3}, "seed": 1}
    (tmp_path / "s.yml").write_text(yaml.safe_dump(spec))
    run = tmp_path / "run"
    assert main(["search", str(tmp_path / "s.yml"), "--out", str(run), "--no-progress"]) == 0
    history, grid_rows = read_history(run), read_grid(run)
    assert len(grid_rows) == len(history) == 8                       # the same number of evaluations
    assert {json.dumps(r["tasks"]["tiny"]["items"]) for r in grid_rows + history} == {"12"}   # the same items
    report = json.loads((run / "report.json").read_text())
    assert report["grid"]["points"] == 11 * 11 * 9 * 9 and report["grid"]["evaluated"] == 8
    best = max(grid_rows, key=lambda r: r["score"])
    entry = next(e for e in report["entries"] if e["name"].startswith("grid best"))
    assert entry["search_score"] == best["score"] == report["grid"]["best"]["score"]
    assert entry["recipe"] == best["recipe"]
    for row in grid_rows:   # global: one value per model and parameter, on the 0.1 grid
        for m in row["recipe"]["models"]:
            for v in m["parameters"].values():
                assert isinstance(v, float) and abs(v * 10 - round(v * 10)) < 1e-6
    assert "grid baseline: 8 of 9801 points" in (run / "report.md").read_text()
    # a second report scores nothing new: the rows come from grid.jsonl
    stamp = (run / "grid.jsonl").stat().st_mtime_ns
    assert main(["search", "--resume", str(run), "--no-progress"]) == 0
    assert (run / "grid.jsonl").stat().st_mtime_ns == stamp and len(read_grid(run)) == 8
