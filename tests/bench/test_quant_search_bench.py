"""Quantization search benchmark on SmolLM2-135M: the searched configs against the best uniform
config at no more total bits, before and after the same recovery, and the two optimizers side by
side at equal evaluations.

Run by `make bench` (pytest -s). One JSON line per figure:

    {"bench": "quant_search", "what": "optimizers_synthetic", ...}   known optimum, both optimizers
    {"bench": "quant_search", "what": "run", "minutes", "generations", "evaluations",
     "first_stage_per_min", "database_s", "database_mb"}
    {"bench": "quant_search", "what": "target", "target", "searched_bpw", "uniform", "uniform_bpw",
     "searched_ppl", "uniform_ppl", "ppl_ratio", "searched_kl", "uniform_kl"}           before recovery
    {"bench": "quant_search", "what": "recovered", "target", "minutes", "searched_ppl", "uniform_ppl",
     "ppl_ratio"}                                                                        after recovery
    {"bench": "quant_search", "what": "optimizers", "optimizer", "evaluations", "fitness"}  SmolLM2

BENCH_QSEARCH_RUN reuses a finished run directory of recipes/smollm2-quant-search.yml instead of
running the 20-minute search; BENCH_QSEARCH_RECOVER_MINUTES (default 10; 0 skips) is the recovery
budget per config, BENCH_QSEARCH_RECOVER_TARGETS (default "3") the targets whose searched and best
uniform configs are recovered (each pair takes twice the budget); BENCH_QSEARCH_OPTIMIZER_MINUTES
(default 4; 0 skips) is each optimizer's time on the short spec.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

RECIPES = Path(__file__).parents[2] / "recipes"


def _emit(**row) -> None:
    print(json.dumps({"bench": "quant_search", **row}), flush=True)


def _workbench(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "workbench.cli", *args], check=True)


def test_optimizers_on_a_synthetic_allocation_with_a_known_optimum():
    """12 units, options of cost 1/2/4 and error 8/2/0.5 x a random sensitivity; 320 evaluations each."""
    import warnings

    from workbench.quant.search import evolve

    warnings.simplefilter("ignore")
    ratios: dict[str, list[float]] = {"levelswitch": [], "cma": []}
    for seed, budget in itertools.product(range(4), (20, 28, 36)):
        rng = np.random.default_rng(seed)
        costs, sens, err = np.tile([1, 2, 4], (12, 1)), rng.uniform(0.1, 3.0, 12), np.array([8.0, 2.0, 0.5])

        def fit(c):
            return float(sum(sens[u] * err[o] for u, o in enumerate(c)))

        best = min(fit(c) for c in itertools.product(range(3), repeat=12) if evolve.config_bytes(costs, c) <= budget)
        score = lambda configs, windows: [fit(c) for c in configs]  # noqa: E731
        start = evolve.repair([0] * 12, costs, budget, np.random.default_rng(0))
        parent, pf = start, fit(start)
        for g in range(40):
            parent, pf = evolve.levelswitch_generation(parent, pf, costs, budget, 8, [(1, 8)], score,
                                                       evolve.generation_rng(0, 0, g))
        es, found = evolve.make_cma(start, 3, 8, seed), np.inf
        for g in range(40):
            found = min(found, min(evolve.cma_generation(es, costs, budget, 1, score, evolve.generation_rng(0, 0, g))[1]))
        ratios["levelswitch"].append(pf / best)
        ratios["cma"].append(found / best)
    for name, r in ratios.items():
        _emit(what="optimizers_synthetic", optimizer=name, evaluations=320, problems=len(r),
              mean_over_optimum=float(np.mean(r)), worst_over_optimum=float(np.max(r)),
              optimum_found=int(sum(x < 1 + 1e-9 for x in r)))
    assert np.mean(ratios["levelswitch"]) <= np.mean(ratios["cma"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    given = os.environ.get("BENCH_QSEARCH_RUN")
    if given:
        return Path(given)
    run = tmp_path_factory.mktemp("qsearch") / "run"
    start = time.perf_counter()
    _workbench("search", str(RECIPES / "smollm2-quant-search.yml"), "--out", str(run), "--no-progress")
    _emit(what="wall", minutes=(time.perf_counter() - start) / 60)
    return run


def test_searched_configs_against_the_best_uniform_ones(run_dir):
    from workbench.quant.search.run import read_front, read_rows

    front = read_front(run_dir)
    rows = read_rows(run_dir)
    first = [r for r in rows if r["kind"] == "levelswitch" and r["windows"] == min(x["windows"] for x in rows)]
    seconds = sum(r["seconds"] for r in first)
    _emit(what="run", minutes=front["elapsed"] / 60, generations=front["generations"], evaluations=front["evaluations"],
          first_stage_per_min=60 * len(first) / max(seconds, 1e-9), database_s=front["database"]["seconds"],
          database_mb=front["database"]["bytes"] / 1e6, front_points=len(front["front"]))
    for t in front["targets"]:
        s, u = t["searched"], t["best_uniform"]
        _emit(what="target", target=t["target"], searched_bpw=s["bpw"], searched_base_bpw=s["base_bpw"],
              uniform=u and u["label"], uniform_bpw=u and u["bpw"], searched_ppl=s["heldout_ppl"],
              uniform_ppl=u and u["heldout_ppl"], ppl_ratio=t["ppl_ratio"], searched_kl=s["heldout_kl"],
              uniform_kl=u and u["heldout_kl"])
    for t in front["targets"]:
        assert t["searched"]["bpw"] <= t["target"] + 1e-9
        assert t["ppl_ratio"] is None or t["ppl_ratio"] <= 0.85, t


def test_searched_against_uniform_after_the_same_recovery(run_dir):
    from workbench.ops.qsearch import read_recovered
    from workbench.quant.search.run import read_front

    minutes = float(os.environ.get("BENCH_QSEARCH_RECOVER_MINUTES", "10"))
    if minutes <= 0:
        pytest.skip("BENCH_QSEARCH_RECOVER_MINUTES=0")
    targets = [float(t) for t in os.environ.get("BENCH_QSEARCH_RECOVER_TARGETS", "3").split(",")]
    front = read_front(run_dir)
    picked = [t for t in front["targets"] if t["target"] in targets and t["best_uniform"]]
    names = [n for t in picked for n in (t["searched"]["yml"], t["best_uniform"]["yml"])]
    _workbench("search", "--recover", str(run_dir), "--points", ",".join(names), "--time-budget", str(minutes),
               "--no-progress", "--overwrite")
    rec = read_recovered(run_dir)
    for t in picked:
        s = rec[t["searched"]["yml"].removesuffix(".yml")]
        u = rec[t["best_uniform"]["yml"].removesuffix(".yml")]
        _emit(what="recovered", target=t["target"], minutes=minutes, searched_bpw=s["bpw"], uniform_bpw=u["bpw"],
              searched_ppl=s["ppl_after"], uniform_ppl=u["ppl_after"], ppl_ratio=s["ppl_after"] / u["ppl_after"],
              searched_kl=s["kl_after"], uniform_kl=u["kl_after"], searched_steps=s["steps"], uniform_steps=u["steps"])
    for t in picked:
        s = rec[t["searched"]["yml"].removesuffix(".yml")]
        u = rec[t["best_uniform"]["yml"].removesuffix(".yml")]
        assert s["ppl_after"] <= 0.85 * u["ppl_after"], (s, u)


def test_levelswitch_against_cma_at_equal_evaluations(tmp_path):
    """The short spec (per decoder block) with each optimizer for the same minutes, then the best
    fitness each reached at the same number of last-stage evaluations."""
    import yaml

    from workbench.quant.search.run import read_rows

    minutes = float(os.environ.get("BENCH_QSEARCH_OPTIMIZER_MINUTES", "4"))
    if minutes <= 0:
        pytest.skip("BENCH_QSEARCH_OPTIMIZER_MINUTES=0")
    spec = yaml.safe_load((RECIPES / "smollm2-quant-short-search.yml").read_text())
    spec["budget"]["max_minutes"] = minutes
    spec["targets"] = [3.0]
    best: dict[str, list[tuple[int, float]]] = {}
    for optimizer in ("levelswitch", "cma"):
        path = tmp_path / f"{optimizer}.yml"
        path.write_text(yaml.safe_dump({**spec, "optimizer": optimizer}))
        run = tmp_path / optimizer
        _workbench("search", str(path), "--out", str(run), "--no-progress", "--no-report")
        rows = [r for r in read_rows(run) if r["generation"] > 0]
        # Count evaluations in last-stage-window equivalents, so multi-step selection's cheap
        # first-stage scores count for what they cost.
        last = spec["stages"][-1]["windows"]
        spent, curve, incumbent = 0.0, [], np.inf
        for r in rows:
            spent += r["windows"] / last
            if r["windows"] == last:
                incumbent = min(incumbent, r["fitness"])
            curve.append((spent, incumbent))
        best[optimizer] = curve
    budget = min(curve[-1][0] for curve in best.values())
    for optimizer, curve in best.items():
        at = min(f for spent, f in curve if spent <= budget) if curve else None
        _emit(what="optimizers", optimizer=optimizer, evaluations=budget, fitness=at, target=3.0)
