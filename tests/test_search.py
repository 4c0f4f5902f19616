"""The evolutionary search on tiny models, with objectives whose optimum is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import write_tiny_task
from workbench.errors import WorkbenchError
from workbench.search.genome import GenomeLayout
from workbench.search.objective import Fitness
from workbench.search.run import Search, read_history
from workbench.search.spec import SpecError, load_spec, spec_from_dict


def linear_spec(models, **extra) -> dict:
    spec = {"name": "t", "models": [str(m) for m in models], "merge_method": "linear",
            "evolve": {"weight": [0.0, 1.0]}, "objective": [{"task": "synthetic"}],
            "budget": {"generations": 6, "population": 6}, "seed": 3, "sigma0": 0.3}
    spec.update(extra)
    return spec


class DistanceObjective:
    """score = exp(-|W - target|^2 / scale) over every parameter: 1 exactly at the target weights."""

    def __init__(self, target: dict[str, torch.Tensor], fail_every: int = 0):
        self.target = target
        self.scale = sum(float((t ** 2).sum()) for t in target.values()) * 1e-3
        self.calls = 0
        self.fail_every = fail_every

    def __call__(self, model, tokenizer, incumbent=None):
        self.calls += 1
        if self.fail_every and self.calls % self.fail_every == 0:
            raise RuntimeError("a candidate that breaks")
        sd = model.state_dict()
        d = sum(float(((sd[k] - v) ** 2).sum()) for k, v in self.target.items())
        return Fitness(float(np.exp(-d / self.scale)), {"synthetic": {"score": float(np.exp(-d / self.scale))}})


def state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def rounded_copy(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    """A copy of a model directory whose float32 weights are rounded to ``dtype`` (stored as float32)."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    save_file({k: v.to(dtype).float() for k, v in state(src).items()}, str(dst / "model.safetensors"))
    return dst


def test_genome_recipe_round_trip_per_layer_and_split(tiny_models):
    base, a, b = tiny_models("llama", 3, num_layers=4)
    spec = spec_from_dict({"models": [str(a), str(b)], "base_model": str(base), "merge_method": "ties",
                           "evolve": {"weight": [0.0, 1.0], "density": [0.1, 1.0]}, "granularity": 2,
                           "split_attention_mlp": True, "fixed": {"normalize": True},
                           "objective": ["synthetic"]})
    layout = GenomeLayout(spec, num_layers=4)
    assert len(layout) == 2 * 2 * 2 * 2  # params x models x groups x parts
    x = np.random.default_rng(0).uniform(size=len(layout))
    recipe = layout.to_recipe(x)
    np.testing.assert_allclose(layout.from_recipe(recipe), x, atol=1e-5)
    w = recipe.models[0].parameters["weight"]
    assert w[0]["filter"] == "attn" and len(w[0]["value"]) == 4 and w[0]["value"][0] == w[0]["value"][1]
    from workbench.merge.plan import plan_merge

    plan = plan_merge(recipe)  # the recipe validates and plans like any other
    q0 = next(j for j in plan.jobs if j.out_name == "model.layers.0.self_attn.q_proj.weight")
    q3 = next(j for j in plan.jobs if j.out_name == "model.layers.3.self_attn.q_proj.weight")
    up3 = next(j for j in plan.jobs if j.out_name == "model.layers.3.mlp.up_proj.weight")
    gene = {(g.param, g.model, g.group, g.part): layout.value(g, xi) for g, xi in zip(layout.genes, x)}
    assert q0.params.per_model[0]["weight"] == pytest.approx(gene[("weight", str(a), 0, "attn")], abs=1e-6)
    assert q3.params.per_model[1]["density"] == pytest.approx(gene[("density", str(b), 1, "attn")], abs=1e-6)
    assert up3.params.per_model[0]["weight"] == pytest.approx(gene[("weight", str(a), 1, "rest")], abs=1e-6)
    plan.close()


def test_search_finds_a_known_optimum_and_writes_its_run(tiny_models, tmp_path):
    a, b = tiny_models("llama", 2)
    A, B = state(a), state(b)
    target = {k: 0.2 * A[k] + 0.8 * B[k] for k in A}  # linear, normalized: weights in ratio 1:4
    spec = spec_from_dict(linear_spec([a, b], budget={"generations": 12, "population": 8}))
    search = Search(spec, tmp_path / "run", objective=DistanceObjective(target)).start()
    final = search.run()
    assert final.stop_reason == "generations"
    best = final.incumbent
    w = [m["parameters"]["weight"] for m in best["recipe"]["models"]]
    assert w[1] / (w[0] + w[1]) == pytest.approx(0.8, abs=0.03)
    assert best["score"] > 0.95
    rows = read_history(tmp_path / "run")
    assert len(rows) == 12 * 9  # 8 candidates and the mean per generation
    assert {"generation", "genome", "recipe", "score", "tasks", "seconds", "merge_seconds"} <= set(rows[0])
    best_yml = yaml.safe_load((tmp_path / "run" / "best.yml").read_text())
    assert best_yml == best["recipe"] and best_yml["merge_method"] == "linear"


def test_resume_after_kill_gives_the_same_history(tiny_models, tmp_path):
    a, b = tiny_models("llama", 2)
    A, B = state(a), state(b)
    target = {k: 0.6 * A[k] + 0.4 * B[k] for k in A}
    spec = spec_from_dict(linear_spec([a, b]))
    Search(spec, tmp_path / "full", objective=DistanceObjective(target)).start().run()

    s = Search(spec, tmp_path / "cut", objective=DistanceObjective(target)).start()
    for _ in range(3):
        s.step()
    # a kill -9 in the middle of generation 3: half its rows written, no checkpoint
    full_rows = read_history(tmp_path / "full")
    with open(tmp_path / "cut" / "history.jsonl", "a") as f:
        f.write(json.dumps(full_rows[3 * 7]) + "\n" + '{"generation": 3, "trunc')
    np.random.seed(12345)  # the process state is gone; only the run directory counts
    resumed = Search(spec_from_dict(linear_spec([a, b])), tmp_path / "cut",
                     objective=DistanceObjective(target)).resume()
    resumed.run()
    cut_rows = read_history(tmp_path / "cut")
    strip = lambda rows: [{k: r[k] for k in ("generation", "index", "genome", "score")} for r in rows]  # noqa: E731
    assert strip(cut_rows) == strip(full_rows)


def test_failing_candidates_do_not_stop_the_run(tiny_models, tmp_path):
    a, b = tiny_models("llama", 2)
    A = state(a)
    spec = spec_from_dict(linear_spec([a, b], budget={"generations": 3, "population": 4}))
    final = Search(spec, tmp_path / "run", objective=DistanceObjective(A, fail_every=3)).start().run()
    rows = read_history(tmp_path / "run")
    failed = [r for r in rows if r["error"]]
    assert failed and all(r["score"] is None and "breaks" in r["error"] for r in failed)
    assert final.incumbent["score"] is not None and len(rows) == 3 * 5


def test_bad_specs_name_the_field(tmp_path, tiny_models):
    a, b = tiny_models("llama", 2)
    good = linear_spec([a, b])
    cases = [
        ({"merge_method": "passthrough"}, "merge_method"),
        ({"evolve": {"weight": [1.0, 0.5]}}, "low < high"),
        ({"evolve": {"normalize": [0, 1]}}, "not a numeric parameter"),
        ({"objective": [{"task": "x", "split": "heldout"}]}, "heldout"),
        ({"budget": {"population": 1}}, "population"),
        ({"granularity": "sometimes"}, "granularity"),
        ({"sigma0": 3}, "sigma0"),
        ({"mutation": 1}, "unknown key"),
        ({"eval_dtype": "float16"}, "eval_dtype"),
    ]
    for change, words in cases:
        path = tmp_path / "spec.yml"
        path.write_text(yaml.safe_dump(good | change))
        with pytest.raises(SpecError, match=words) as e:
            load_spec(path)
        assert str(e.value).startswith(str(path))
    with pytest.raises(WorkbenchError, match="not empty"):
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "x").write_text("")
        Search(spec_from_dict(good), tmp_path / "busy", objective=DistanceObjective(state(a))).start()


def test_cli_search_export_merge_and_resume(tiny_models, tmp_path, capsys):
    from workbench.cli import main

    base, a, b = tiny_models("llama", 3)
    task = write_tiny_task(tmp_path / "tiny.yml")
    spec = {"name": "cli", "base_model": str(base), "models": [str(a), str(b)], "merge_method": "ties",
            "evolve": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}, "fixed": {"normalize": True},
            "objective": [{"task": str(task)}], "budget": {"generations": 2, "population": 3}, "seed": 1}
    (tmp_path / "s-search.yml").write_text(yaml.safe_dump(spec))
    run = tmp_path / "run"
    assert main(["search", str(tmp_path / "s-search.yml"), "--out", str(run), "--no-progress"]) == 0
    rows = read_history(run)
    assert len(rows) == 2 * 4 and all(r["score"] is not None and 0 <= r["score"] <= 1 for r in rows)
    assert rows[0]["tasks"]["tiny"]["items"] == 12
    report = json.loads((run / "report.json").read_text())
    names = [e["name"] for e in report["entries"]]
    assert names[0].startswith("search #1") and "base" in names and "ties (density 0.5)" in names
    assert all(0 <= e["heldout"]["tiny"]["acc"] <= 1 for e in report["entries"])
    assert main(["recipe", "export", str(run), str(tmp_path / "best.yml")]) == 0
    assert main(["merge", str(tmp_path / "best.yml"), str(tmp_path / "merged"), "--no-progress"]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    # a finished run resumes to nothing more: no new rows
    assert main(["search", "--resume", str(run), "--no-progress", "--no-report"]) == 0
    assert len(read_history(run)) == 8
    assert main(["search", str(tmp_path / "s-search.yml"), "--out", str(run), "--no-progress"]) == 2  # not empty


def test_example_search_specs_validate():
    specs = [p for p in sorted((Path(__file__).parent.parent / "recipes").glob("*-search.yml"))
             if "kind: quantization" not in p.read_text()]  # those: test_quant_search.py
    assert len(specs) >= 3
    for path in specs:
        spec = load_spec(path)
        assert spec.objective and spec.budget.population >= 2
        layout = GenomeLayout(spec, num_layers=30)
        assert len(layout) >= 2


def _histories_equal(a: Path, b: Path) -> None:
    keep = ("generation", "index", "kind", "genome", "score")
    assert [{k: r[k] for k in keep} for r in read_history(a)] == [{k: r[k] for k in keep} for r in read_history(b)]


@pytest.mark.parametrize("backend", ["processes", "ray"])
def test_parallel_backends_give_the_local_history(tiny_models, tmp_path, backend):
    if backend == "ray":
        pytest.importorskip("ray")
    a, b = tiny_models("llama", 2)
    A, B = state(a), state(b)
    target = {k: 0.3 * A[k] + 0.7 * B[k] for k in A}
    spec = spec_from_dict(linear_spec([a, b], budget={"generations": 2, "population": 4}))
    local = Search(spec, tmp_path / "local", objective=DistanceObjective(target)).start()
    local.run()
    other = Search(spec, tmp_path / backend, objective=DistanceObjective(target), backend=backend, workers=2).start()
    try:
        other.run()
    finally:
        other.close()
    _histories_equal(tmp_path / "local", tmp_path / backend)


def test_resident_model_holds_the_eval_dtype(tiny_models, tmp_path):
    """The resident model is bfloat16 by default (spec eval_dtype); tensors merge in float32 and
    are rounded once, on the copy in."""
    from workbench.merge.executor import execute_merge
    from workbench.merge.plan import plan_merge
    from workbench.search.candidates import InMemoryMerger
    from workbench.search.genome import GenomeLayout

    a, b = tiny_models("llama", 2)
    spec = spec_from_dict(linear_spec([a, b]))
    assert spec.eval_dtype == "bfloat16"
    layout = GenomeLayout(spec, 2)
    recipe = layout.to_recipe(np.full(len(layout), 0.3))
    merger = InMemoryMerger(recipe, model_dtype=spec.eval_dtype)
    merger.apply(recipe)
    plan = plan_merge(recipe)
    try:
        execute_merge(plan, tmp_path / "merged")
    finally:
        plan.close()
    ref = state(tmp_path / "merged")
    got = dict(merger.model.named_parameters())
    for name, tensor in ref.items():
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], tensor.to(torch.bfloat16)), name


def test_merger_tells_recipes_apart_by_model_not_position(tiny_models):
    """Each source alone is model 0 of its own recipe (the held-out report does this): switching
    between them must merge again, not keep the previous model."""
    from workbench.merge.recipe import recipe_from_dict
    from workbench.search.candidates import InMemoryMerger

    a, b = tiny_models("llama", 2)
    alone = {m: recipe_from_dict({"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}}]})
             for m in (a, b)}
    both = recipe_from_dict({"merge_method": "linear", "models": [
        {"model": str(m), "parameters": {"weight": 0.5}} for m in (a, b)]})
    merger = InMemoryMerger(both, model_dtype="float32")   # holds both sources
    for m in (a, b, a):
        assert merger.apply(alone[m]).tensors_merged > 0
        got = dict(merger.model.named_parameters())
        for name, tensor in state(m).items():
            assert torch.equal(got[name], tensor), (m, name)


@pytest.mark.parametrize("method,dtype", [("ties", "float32"), ("breadcrumbs_ties", "float32"), ("ties", "bfloat16")])
def test_cached_magnitude_order_gives_the_streaming_merge(tiny_models, tmp_path, method, dtype):
    """The in-memory merger keeps each delta's sorted magnitudes for TIES / Breadcrumbs thresholds;
    candidate after candidate (other densities, same cache) it must equal `workbench merge` (of the
    sources rounded to the recipe's dtype, the dtype the merger holds them in)."""
    from workbench.merge.executor import execute_merge
    from workbench.merge.plan import plan_merge
    from workbench.merge.recipe import recipe_from_dict
    from workbench.search.candidates import InMemoryMerger

    models = tiny_models("llama", 3)
    held = [rounded_copy(m, tmp_path / f"rounded-{i}", getattr(torch, dtype)) for i, m in enumerate(models)]

    def recipe(d1: float, d2: float, paths=models):
        base, a, b = paths
        extra = {"gamma": 0.05} if method == "breadcrumbs_ties" else {}
        return recipe_from_dict({"merge_method": method, "base_model": str(base), "dtype": dtype,
                                 "parameters": {"normalize": True},
                                 "models": [{"model": str(a), "parameters": {"weight": 0.7, "density": d1, **extra}},
                                            {"model": str(b), "parameters": {"weight": 0.4, "density": d2, **extra}}]})

    merger = InMemoryMerger(recipe(0.5, 0.5), model_dtype=dtype)
    for i, (d1, d2) in enumerate([(0.3, 0.8), (0.61, 0.17)]):
        merger.apply(recipe(d1, d2))
        assert merger._sorted, "the magnitude order is cached"
        plan = plan_merge(recipe(d1, d2, held))
        try:
            execute_merge(plan, tmp_path / f"m{i}")
        finally:
            plan.close()
        got = dict(merger.model.named_parameters())
        for name, tensor in state(tmp_path / f"m{i}").items():
            assert torch.equal(got[name], tensor.to(got[name].dtype)), (d1, d2, name)


HEAP_PROBE = """
import resource, sys, torch
from workbench.search.heap import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    print("unsupported"); raise SystemExit
def touch():
    x = torch.empty(16 << 20, dtype=torch.float32)   # 64 MiB: above glibc's default mmap threshold
    x.fill_(1.0)
for _ in range(20):   # warm up: here the first ~9 rounds still fault before the heap settles
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    touch()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def test_search_workers_reuse_freed_buffers_without_page_faults():
    """A 64 MiB buffer allocated again after a free: fresh pages (16K faults) every time by default
    (glibc maps it anew), reused heap memory once the worker's heap keeps freed memory."""
    import subprocess
    import sys

    def faults(mode: str) -> str:
        return subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True,
                              check=True).stdout.strip()

    kept = faults("keep")
    if kept == "unsupported":
        pytest.skip("not glibc")
    pages = (64 << 20) // 4096
    assert float(faults("default")) > 0.5 * pages
    assert float(kept) < 0.05 * pages


def test_joint_mode_scores_each_merge_after_quantizing(tiny_models, tmp_path):
    """`quantize: CFG` in a merge spec: a candidate's score is the objective of its merge quantized by
    CFG (as `quantized_copy`, from the merged tensors); the report scores entries both ways."""
    from workbench.cli import main
    from workbench.eval.evaluator import evaluate
    from workbench.merge.recipe import recipe_from_dict
    from workbench.quant.config import load_quant_config
    from workbench.quant.model import quant_layers, quantized_copy
    from workbench.search.candidates import InMemoryMerger

    base, a, b = tiny_models("llama", 3)
    task = write_tiny_task(tmp_path / "tiny.yml")
    cfg = tmp_path / "q.yml"
    cfg.write_text("bits: ternary\ngroup_size: 16\nlora: {rank: 2}\n")
    spec = {"name": "joint", "base_model": str(base), "models": [str(a), str(b)], "merge_method": "ties",
            "evolve": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}, "fixed": {"normalize": True},
            "objective": [{"task": str(task)}], "budget": {"generations": 1, "population": 3}, "seed": 1,
            "quantize": "q.yml", "eval_dtype": "float32"}  # relative to the spec file
    path = tmp_path / "j-search.yml"
    path.write_text(yaml.safe_dump(spec))
    assert load_spec(path).quantize == str(cfg.resolve())
    run = tmp_path / "run"
    assert main(["search", str(path), "--out", str(run), "--no-progress"]) == 0
    row = read_history(run)[0]
    recipe = recipe_from_dict(row["recipe"])
    merger = InMemoryMerger(recipe, seed=1)
    merger.apply(recipe)
    quantized = quantized_copy(merger.model, load_quant_config(cfg))
    assert len(quant_layers(quantized)) == 28 and not quant_layers(merger.model)
    (ours,) = evaluate(quantized, merger.tokenizer, str(task), split="search").values()
    (plain,) = evaluate(merger.model, merger.tokenizer, str(task), split="search").values()
    assert row["score"] == pytest.approx(ours.score, abs=1e-6) and ours.score != pytest.approx(plain.score, abs=1e-6)
    report = json.loads((run / "report.json").read_text())
    assert report["quantize"] == str(cfg.resolve()) and all("heldout_quantized" in e for e in report["entries"])
    assert "quantized" in (run / "report.md").read_text()
    bad = {**spec, "quantize": "missing.yml"}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(SpecError, match=r"j-search.yml:\d+: quantize: missing.yml: quantization config not found"):
        load_spec(path)


def test_bfloat16_sources_score_as_float32_sources_rounded_to_bfloat16(tiny_models, tmp_path):
    """Sources held in bfloat16 (spec dtype) merge in float32 and round once: every candidate's score
    equals that of a float32-source search over the same models rounded to bfloat16 first."""
    models = tiny_models("llama", 3)
    rounded = [rounded_copy(m, tmp_path / f"r{i}", torch.bfloat16) for i, m in enumerate(models)]
    task = write_tiny_task(tmp_path / "tiny.yml")

    def run(paths, dtype, name):
        base, a, b = paths
        spec = spec_from_dict({"name": name, "base_model": str(base), "models": [str(a), str(b)],
                               "merge_method": "ties", "evolve": {"weight": [0.0, 1.0], "density": [0.2, 1.0]},
                               "fixed": {"normalize": True}, "objective": [{"task": str(task)}], "dtype": dtype,
                               "budget": {"generations": 2, "population": 3}, "seed": 3})
        search = Search(spec, tmp_path / name).start()
        held = {t.dtype for t in search.backend.worker.merger._sources.values()}
        search.run()
        return held, [(r["genome"], r["score"], r["tasks"]) for r in read_history(tmp_path / name)]

    held16, rows16 = run(models, "bfloat16", "bf16")
    held32, rows32 = run(rounded, "float32", "f32")
    assert held16 == {torch.bfloat16} and held32 == {torch.float32}
    assert len(rows16) == 8 and rows16 == rows32
    assert len({r[1] for r in rows16}) > 1   # the candidates differ: the comparison means something
