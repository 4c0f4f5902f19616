"""Memory plans (workbench.memory_plan): figures from headers against independent counts, refusal
before any tensor is read, `workbench search --plan`, and plans against measured peak RSS growth."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_tokenizer, write_tiny_task
from workbench.memory_plan import MemoryPlanError, Need, Plan, default_source_dtype, merge_plan, search_plan
from workbench.search.run import resolve_models
from workbench.search.spec import spec_from_dict

MiB = 2**20


def ties_spec(base, models, task, **extra) -> dict:
    return {"name": "plan", "base_model": str(base), "models": [str(m) for m in models], "merge_method": "ties",
            "evolve": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}, "fixed": {"normalize": True},
            "objective": [{"task": str(task)}], "budget": {"generations": 1, "population": 2}, **extra}


def numels(path: Path) -> dict[str, int]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}


def need(plan: Plan, prefix: str) -> int:
    [n] = [n for n in plan.needs if n.what.startswith(prefix)]
    return n.nbytes


@pytest.mark.parametrize("dtype,size", [("float32", 4), ("bfloat16", 2)])
def test_search_plan_counts_sources_model_and_cache_from_headers(tiny_models, tmp_path, dtype, size):
    base, a, b = tiny_models("llama", 3)
    spec = resolve_models(spec_from_dict(ties_spec(base, [a, b], write_tiny_task(tmp_path / "t.yml"), dtype=dtype)))
    plan = search_plan(spec, "cpu")
    per_model = sum(numels(base).values())
    assert need(plan, "sources") == 3 * per_model * size
    assert need(plan, "resident model") == per_model * 2          # eval_dtype bfloat16
    assert need(plan, "sorted-magnitude cache") == 2 * per_model * 4   # two deltas, float32
    off = search_plan(spec, "cpu", sorted_cache=False)
    assert not [n for n in off.needs if n.what.startswith("sorted")]
    assert off.total("cpu") < plan.total("cpu") and plan.fits()
    two = search_plan(spec, "cpu", 2)
    assert need(two, "sources") == 2 * need(plan, "sources")


def test_default_source_dtype_is_bfloat16_on_gpus_only(tiny_models, tmp_path):
    from workbench.search.genome import GenomeLayout
    from workbench.search.candidates import InMemoryMerger

    assert default_source_dtype("cpu") == "float32" and default_source_dtype("cuda:1") == "bfloat16"
    base, a, b = tiny_models("llama", 3)
    spec = spec_from_dict(ties_spec(base, [a, b], write_tiny_task(tmp_path / "t.yml")))
    assert spec.dtype is None
    layout = GenomeLayout(spec, 4)
    merger = InMemoryMerger(layout.to_recipe(layout.start()), model_dtype="bfloat16")
    assert {t.dtype for t in merger._sources.values()} == {torch.float32}
    bf = spec_from_dict(ties_spec(base, [a, b], write_tiny_task(tmp_path / "t.yml"), dtype="bfloat16"))
    merger = InMemoryMerger(GenomeLayout(bf, 4).to_recipe(layout.start()), sorted_cache=False)
    assert {t.dtype for t in merger._sources.values()} == {torch.bfloat16}
    merger.apply(GenomeLayout(bf, 4).to_recipe(layout.start()))
    assert not merger._sorted and merger.sorted_cache_bytes == 0


def test_plan_table_totals_and_skip():
    plan = Plan("x", [Need("cpu", "kept", 100 * MiB), Need("cpu", "phase a", 30 * MiB, transient=True),
                      Need("cpu", "phase b", 50 * MiB, transient=True)], {"cpu": 140 * MiB}, suggestion="less")
    assert plan.total("cpu") == 150 * MiB and not plan.fits()
    assert "DOES NOT FIT" in plan.table() and "would fit: less" in plan.table()
    with pytest.raises(MemoryPlanError, match="needs 150.00 MiB, has 140.00 MiB free.*Would fit: less"):
        plan.check()


def test_combined_plans_add_the_transients_of_workers_side_by_side():
    """Two GPU workers' plans, each with a transient need on the host: both phases can run at once,
    so the host's total adds each plan's largest transient; each GPU keeps its own."""
    from workbench.memory_plan import combine_plans

    def worker(gpu: str) -> Plan:
        return Plan(gpu, [Need(gpu, "sources", 100 * MiB), Need(gpu, "scoring", 20 * MiB, transient=True),
                          Need("cpu", "kl teacher pass", 60 * MiB, transient=True),
                          Need("cpu", "tokenizer", 10 * MiB, transient=True)], {gpu: 200 * MiB, "cpu": 100 * MiB})

    both = combine_plans([worker("cuda:0"), worker("cuda:1")])
    assert both.total("cpu") == 120 * MiB and both.total("cuda:0") == both.total("cuda:1") == 120 * MiB
    assert both.short() == ["cpu"] and worker("cuda:0").fits()


def test_skip_env_lets_a_plan_that_does_not_fit_run(monkeypatch):
    plan = Plan("x", [Need("cpu", "kept", 2 * MiB)], {"cpu": MiB})
    monkeypatch.setenv("WORKBENCH_NO_PLAN_CHECK", "1")
    plan.check()


def test_suggestion_names_the_setting_that_fits(tiny_models, tmp_path):
    base, a, b = tiny_models("llama", 3)
    spec = resolve_models(spec_from_dict(ties_spec(base, [a, b], write_tiny_task(tmp_path / "t.yml"),
                                                   dtype="float32")))
    full = search_plan(spec, "cpu", sorted_cache=False, free={"cpu": 2**40})
    sources = need(full, "sources")
    # room for everything but half the float32 sources: bfloat16 sources fit, float32 do not
    free = {"cpu": full.total("cpu") - sources // 2 + 1024}
    plan = search_plan(spec, "cpu", sorted_cache=False, free=free)
    assert not plan.fits() and plan.suggestion.startswith("spec `dtype: bfloat16`")
    assert search_plan(spec, "cpu", sorted_cache=False, source_dtype="bfloat16", free=free).fits()
    # three workers where one fits: fewer workers
    three = search_plan(spec, "cpu", 3, sorted_cache=False, source_dtype="bfloat16",
                        free={"cpu": int(full.total("cpu") * 1.2)})
    assert not three.fits() and "--workers 1" in three.suggestion


def _no_tensor_reads(monkeypatch):
    from workbench.models import safetensors_io

    def refuse(self, name):
        raise AssertionError(f"tensor {name} of {self.path} was read before the memory check")

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "get_tensor", refuse)
    monkeypatch.setattr("workbench.memory_plan.free_bytes", lambda device: 64 * 1024)


def test_merge_that_cannot_fit_is_refused_before_any_tensor_is_read(tiny_models, tmp_path, monkeypatch):
    from workbench.merge.recipe import recipe_from_dict
    from workbench.ops.merge import merge

    base, a, b = tiny_models("llama", 3)
    recipe = recipe_from_dict({"merge_method": "ties", "base_model": str(base), "models": [
        {"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in (a, b)]})
    plan = merge_plan(recipe)
    # the largest tensor's three inputs at least
    assert plan.total("cpu") >= 3 * max(numels(base).values()) * 4
    _no_tensor_reads(monkeypatch)
    with pytest.raises(MemoryPlanError, match="will not fit in memory.*nothing was loaded"):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_search_that_cannot_fit_is_refused_before_any_tensor_is_read(tiny_models, tmp_path, monkeypatch, capsys):
    from workbench.cli import main
    from workbench.ops.search import open_search

    base, a, b = tiny_models("llama", 3)
    path = tmp_path / "s-search.yml"
    path.write_text(yaml.safe_dump(ties_spec(base, [a, b], write_tiny_task(tmp_path / "t.yml"))))
    assert main(["search", str(path), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: search plan on cpu" in out and "sources (3 models, float32)" in out and "fits" in out
    _no_tensor_reads(monkeypatch)
    with pytest.raises(MemoryPlanError, match="search plan on cpu: will not fit in memory"):
        open_search(path, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert main(["search", str(path), "--plan"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


# --- plans against measured peaks ------------------------------------------------------------

PROBE = r"""
import json, re, sys
import torch, transformers
from transformers import LlamaForCausalLM
from workbench.eval.evaluator import evaluate

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

kind, args = sys.argv[1], json.loads(sys.argv[2])
torch.set_num_threads(1)
if kind == "search":
    import numpy as np
    from workbench.search.backends import CandidateWorker
    from workbench.search.run import resolve_models
    from workbench.search.spec import load_spec
    spec = resolve_models(load_spec(args["spec"]))
    open("/proc/self/clear_refs", "w").write("5")   # the peak from here on
    base = status("VmRSS")
    worker = CandidateWorker(spec, args["layers"])
    rng = np.random.default_rng(0)
    for i in range(2):
        row = worker.evaluate((rng.uniform(0, 1, len(worker.layout)).tolist(), 0, i, "candidate", None))
        assert row["error"] is None, row["error"]
else:
    from workbench.ops.merge import merge
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
    merge(args["recipe"], args["out"])
print(json.dumps({"growth": status("VmHWM") - base}))
"""


def save_model(path: Path, seed: int, base: Path | None = None) -> Path:
    """A ~44 MB Llama (vocab 16384, hidden 256, 4 layers): big enough that planned bytes dominate."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=16384, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    path.mkdir()
    cfg.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    if base is not None:
        tensors = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in load_file(base / "model.safetensors").items()}
    else:
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
        tensors = {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_plans_match_measured_peak_growth_within_25_percent(tmp_path):
    """A TIES search worker (bfloat16 and float32 sources) and a TIES merge of three ~44 MB models,
    each measured in a process of its own (peak RSS growth after the imports, from /proc's
    high-water mark reset by clear_refs), against their plans."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak")
    from workbench.merge.recipe import load_recipe
    from workbench.search.spec import load_spec

    base = save_model(tmp_path / "m0", 0)
    a, b = save_model(tmp_path / "m1", 1, base), save_model(tmp_path / "m2", 2, base)
    task = write_tiny_task(tmp_path / "t.yml")
    specs = {}
    for dtype in ("float32", "bfloat16"):
        specs[dtype] = tmp_path / f"{dtype}-search.yml"
        specs[dtype].write_text(yaml.safe_dump(ties_spec(base, [a, b], task, dtype=dtype)))
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base), "models": [
        {"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in (a, b)]}))
    jobs = {d: ("search", {"spec": str(p), "layers": 4}) for d, p in specs.items()}
    jobs["merge"] = ("merge", {"recipe": str(recipe), "out": str(tmp_path / "out")})
    procs = {k: subprocess.Popen([sys.executable, "-c", PROBE, kind, json.dumps(args)], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True) for k, (kind, args) in jobs.items()}
    measured = {}
    for k, p in procs.items():
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, k
        measured[k] = json.loads(out.strip().splitlines()[-1])["growth"]
    planned = {d: search_plan(resolve_models(load_spec(p)), "cpu").total("cpu") for d, p in specs.items()}
    planned["merge"] = merge_plan(load_recipe(recipe)).total("cpu")
    for k in measured:
        assert abs(planned[k] - measured[k]) <= 0.25 * measured[k], (k, planned[k] / MiB, measured[k] / MiB)
    assert planned["bfloat16"] < planned["float32"] and measured["bfloat16"] < measured["float32"]


def test_recovery_plan_counts_teacher_adapters_optimizer_and_cache(tiny_models, tmp_path):
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from workbench.memory_plan import recovery_plan
    from workbench.quant.config import quant_config_from_dict
    from workbench.quant.model import quantize_model, save_quantized
    from workbench.quant.options import RecoverOptions

    [src] = tiny_models("llama", 1)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    teacher_numel = sum(p.numel() for p in model.parameters())   # untied: every tensor stored once
    quantize_model(model, quant_config_from_dict({"bits": 2, "group_size": 16, "lora": {"rank": 2}}))
    qdir = save_quantized(model, tmp_path / "q", src, quant_config_from_dict({"bits": 2, "group_size": 16,
                                                                              "lora": {"rank": 2}}))
    lora = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B")))
    scales = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("scale", "zero")))
    opts = RecoverOptions(seq_len=32, batch_size=2, max_tokens=32 * 8, top_k=8, scale_lr=0)
    plan = recovery_plan(qdir, src, opts)
    assert need(plan, "teacher (float32)") == teacher_numel * 4
    assert need(plan, "trainable parameters") == lora * 16      # value, gradient, two AdamW moments
    assert need(plan, "teacher top-k cache") == 8 * 32 * (8 * 12 + 4)
    with_scales = recovery_plan(qdir, src, replace(opts, scale_lr=1e-5))
    assert need(with_scales, "trainable parameters") == (lora + scales) * 16
    bigger = recovery_plan(qdir, src, replace(opts, batch_size=4))
    assert need(bigger, "one step's activations") > need(plan, "one step's activations")
    tight = recovery_plan(qdir, src, replace(opts, batch_size=4), free={"cpu": bigger.total("cpu") - 1})
    assert not tight.fits() and tight.suggestion.startswith("--batch-size 1")
