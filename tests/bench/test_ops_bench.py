"""The operations layer costs nothing: merge, eval and a merge search, side by side with an earlier
commit, and the up-front checks against a merge's wall time (3x SmolLM2-135M-Instruct).

Run by `make bench`. The earlier commit (``BENCH_BASELINE_REV``, default ``HEAD~1``) is unpacked
with `git archive` into a temporary directory and run from there (``PYTHONPATH``), with the same
venv, models and home. Each command runs as a child process, interleaved baseline / this tree,
``BENCH_REPEATS`` (default 3) times; the figure is the least wall time of each. One JSON line per
figure:

    {"bench": "ops", "action": "merge", "baseline_s": ..., "head_s": ..., "ratio": ...}
    {"bench": "ops", "action": "checks", "headers_s": ..., "nonfinite_s": ..., "merge_s": ..., "share": ...}

Targets: every ratio <= 1.10 (noise here is up to 1.5x on single runs, least-of-3 brings it near
5%), the checks' share of the merge <= 2%. The share: opening and checking every file's header
against its size (``check_weight_files`` for the three models) plus the non-finite check (one sum
per merged tensor, timed alone on the merged tensors), over the merge's wall time. A merge with the
check minus one with ``allow_nonfinite`` is printed beside it; at 5% noise it cannot resolve 1%.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
RATIO = 1.10
SHARE = 0.02


@pytest.fixture(scope="module")
def models() -> list[Path]:
    from workbench.models.default_model import prepare_default
    from workbench.models.variants import ensure_variants

    base = prepare_default()
    return [base, *ensure_variants(base, ["variant-a", "variant-b"])]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    rev = os.environ.get("BENCH_BASELINE_REV", "HEAD~1")
    tree = tmp_path_factory.mktemp("baseline")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def run(tree: Path, args: list, cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    check = subprocess.run([sys.executable, "-c", "import workbench; print(workbench.__file__)"], env=env,
                           capture_output=True, text=True, check=True, cwd=cwd)
    assert check.stdout.startswith(str(tree)), check.stdout   # the tree under test, not the installed one
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    return seconds


def side_by_side(action: str, baseline: Path, make_args, tmp: Path) -> dict:
    times = {"baseline": [], "head": []}
    for i in range(REPEATS):
        for name, tree in (("baseline", baseline), ("head", REPO)):
            work = tmp / f"{action}-{name}-{i}"
            work.mkdir()
            times[name].append(run(tree, make_args(work), work))
            shutil.rmtree(work, ignore_errors=True)
    row = {"bench": "ops", "action": action, "baseline_s": round(min(times["baseline"]), 3),
           "head_s": round(min(times["head"]), 3), "ratio": round(min(times["head"]) / min(times["baseline"]), 3),
           "runs": REPEATS}
    print(json.dumps(row), flush=True)
    return row


def recipe(models: list[Path], path: Path) -> Path:
    base, a, b = models
    path.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n"
                    f"  - {{model: {a}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
                    f"  - {{model: {b}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
                    "parameters: {normalize: true}\ndtype: float32\n")
    return path


def test_actions_are_not_slower_than_before(models, baseline):
    tmp = Path(tempfile.mkdtemp(prefix="ops-bench-"))
    try:
        r = recipe(models, tmp / "ties.yml")
        spec = tmp / "search.yml"
        spec.write_text(f"name: ops-bench\nbase_model: {models[0]}\nmodels: [{models[1]}, {models[2]}]\n"
                        "merge_method: ties\nevolve: {weight: [0.0, 1.0], density: [0.2, 1.0]}\n"
                        "fixed: {normalize: true}\nobjective: [{task: zoo-perplexity}]\nlimit: 2\n"
                        "budget: {generations: 2, population: 2}\nseed: 0\n")
        rows = [
            side_by_side("merge", baseline, lambda w: ["merge", r, w / "out", "--no-progress"], tmp),
            side_by_side("eval", baseline, lambda w: ["eval", models[0], "zoo-perplexity", "--split", "heldout",
                                                      "--limit", "4", "--no-progress"], tmp),
            side_by_side("search", baseline, lambda w: ["search", spec, "--out", w / "run", "--no-progress",
                                                        "--no-report"], tmp),
        ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    slow = [row for row in rows if row["ratio"] > RATIO]
    assert not slow, f"slower than {os.environ.get('BENCH_BASELINE_REV', 'HEAD~1')}: {slow}"


def test_up_front_checks_cost_at_most_two_percent_of_a_merge(models, tmp_path):
    import torch
    from safetensors.torch import load_file

    from workbench.merge.recipe import load_recipe
    from workbench.models.checkpoint import check_weight_files
    from workbench.ops.merge import merge

    r = load_recipe(recipe(models, tmp_path / "ties.yml"))
    headers, sums, checked, unchecked = [], [], [], []
    for i in range(REPEATS):
        start = time.perf_counter()
        for m in models:
            check_weight_files(m)
        headers.append(time.perf_counter() - start)
        order = ((False, checked), (True, unchecked))
        for allow, times in order if i % 2 == 0 else order[::-1]:   # alternate: no bias from running first
            out = tmp_path / f"out-{i}-{allow}"
            start = time.perf_counter()
            merge(r, out, allow_nonfinite=allow)
            times.append(time.perf_counter() - start)
            if not allow:   # the check itself, timed alone: one sum per merged tensor (check_finite's fast path)
                merged = load_file(str(out / "model.safetensors"))
                start = time.perf_counter()
                assert all(bool(torch.isfinite(t.sum())) for t in merged.values())
                sums.append(time.perf_counter() - start)
                del merged
            shutil.rmtree(out)
    share = (min(headers) + min(sums)) / min(checked)
    print(json.dumps({"bench": "ops", "action": "checks", "headers_s": round(min(headers), 4),
                      "nonfinite_s": round(min(sums), 4), "merge_s": round(min(checked), 3),
                      "merge_unchecked_s": round(min(unchecked), 3),
                      "merge_difference_s": round(min(checked) - min(unchecked), 3), "share": round(share, 4)}),
          flush=True)
    assert share <= SHARE
