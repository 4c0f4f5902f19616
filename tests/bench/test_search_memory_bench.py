"""Search memory: sources held in bfloat16 against float32, and memory plans against measured peaks.

Sources: the default model (SmolLM2-135M-Instruct) and its two seeded variants
(`workbench.ops.variants.ensure_default_variants`, what the first-run search uses; the default zoo
is not needed), a TIES search over them scored by zoo-kl and zoo-perplexity (the first-run spec).
Each figure is measured in a process of its own with a fresh workbench home (models linked in, so
the KL teacher's top-k is computed in every run alike): peak RSS growth over the process after its
imports (``/proc/self/clear_refs`` resets the high-water mark), the whole peak (VmHWM), and
candidates per minute after one untimed warm-up candidate. One JSON line per figure::

    {"bench": "search_memory", "run": "float32", "growth_mb": ..., "peak_rss_mb": ..., "plan_mb": ...,
     "plan_over_measured": ..., "candidates_per_min": ...}
    {"bench": "search_memory", "run": "bfloat16", ...}
    {"bench": "search_memory", "run": "float32_rounded", ...}   # float32 sources rounded to bfloat16 first
    {"bench": "search_memory", "growth_ratio_bf16_f32": ..., "peak_ratio_bf16_f32": ..., "cpm_ratio_bf16_f32": ...,
     "max_score_diff_bf16_vs_rounded": ...}
    {"bench": "merge_memory", "models": 3, "growth_mb": ..., "plan_mb": ..., "plan_over_measured": ...}
    {"bench": "recovery_memory", "model": "llama-63MB ...", "growth_mb": ..., "plan_mb": ..., "plan_over_measured": ...}

The recovery is of a seeded ~63 MB Llama (SmolLM2's vocabulary and tokenizer, hidden 256, 4 layers,
tied embeddings; 2-bit, group 16, LoRA rank 8) taught by itself, a few steps of each phase:
quantizing SmolLM2 first would take most of the bench's time.

Asserted: the bfloat16-source scores equal the rounded float32-source scores exactly; every plan is
within 25% of its measured growth; bfloat16 sources score candidates no slower (within 10% noise).
The 0.55x peak target is reported (``meets_0_55``): the sorted-magnitude cache (two float32 deltas)
and the scoring buffers do not shrink with the sources' dtype. Knobs: BENCH_MEMORY_CANDIDATES (4).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

N_CANDIDATES = int(os.environ.get("BENCH_MEMORY_CANDIDATES", "4"))
MB = 1e6

PROBE = r"""
import json, re, sys, time
import numpy as np
import torch, transformers
from transformers import LlamaForCausalLM
from workbench.eval.evaluator import evaluate

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

kind, args = sys.argv[1], json.loads(sys.argv[2])
out = {}
if kind == "search":
    from workbench.search.backends import CandidateWorker
    from workbench.search.run import resolve_models
    from workbench.search.spec import spec_from_dict
    spec = resolve_models(spec_from_dict(args["spec"]))
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
    t0 = time.perf_counter()
    worker = CandidateWorker(spec, args["layers"])
    out["setup_s"] = time.perf_counter() - t0
    warmup, *genomes = np.random.default_rng(0).uniform(size=(args["candidates"] + 1, len(worker.layout)))
    assert worker.evaluate((warmup.tolist(), 0, 0, "warmup", None))["error"] is None
    t0 = time.perf_counter()
    rows = [worker.evaluate((g.tolist(), 0, i, "candidate", None)) for i, g in enumerate(genomes)]
    out["seconds"] = time.perf_counter() - t0
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows]
    out["scores"] = [r["score"] for r in rows]
    out["merge_s"] = sum(r["merge_seconds"] for r in rows)
elif kind == "recover":
    from workbench.ops.quant import recover
    from workbench.quant.options import RecoverOptions
    opts = RecoverOptions(**args["opts"])
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
    recover(args["qdir"], args["teacher"], args["out"], opts, corpus="licenses", eval_task=None, device="cpu")
else:
    from workbench.merge.executor import keep_freed_memory
    from workbench.ops.merge import merge
    keep_freed_memory()   # as `workbench merge` does
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
    merge(args["recipe"], args["out"])
out.update(growth=status("VmHWM") - base, peak=status("VmHWM"))
print(json.dumps(out))
"""


def emit(bench: str = "search_memory", **fields) -> None:
    print(json.dumps({"bench": bench, **fields}), flush=True)


def probe(kind: str, args: dict, home: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WORKBENCH_HOME=str(home))
    proc = subprocess.run([sys.executable, "-c", PROBE, kind, json.dumps(args)], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fresh_home(root: Path, models: Path) -> Path:
    """A workbench home whose models/ is the real one (linked): no KL cache, nothing else."""
    root.mkdir(parents=True)
    (root / "models").symlink_to(models)
    return root


def rounded_copy(src: Path, dst: Path) -> Path:
    """``src`` with every float32 weight rounded to bfloat16 (and stored as float32 again)."""
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.to(torch.bfloat16).to(v.dtype) if v.dtype == torch.float32 else v
                       for k, v in load_file(f).items()}, str(dst / f.name), metadata={"format": "pt"})
        elif f.is_file():
            shutil.copy2(f, dst / f.name)
    return dst


def spec(base: Path, variants: list[Path], dtype: str) -> dict:
    from workbench.ops.variants import variant_spec_dict

    data = variant_spec_dict([str(v) for v in variants], str(base))
    return {**data, "dtype": dtype}


@pytest.mark.timeout(3600)
def test_search_sources_in_bfloat16_and_plans_against_measured_peaks(tmp_path):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak")
    from workbench.home import models_dir
    from workbench.memory_plan import merge_plan, search_plan
    from workbench.merge.recipe import dump_recipe, recipe_from_dict
    from workbench.models.checkpoint import ModelDir
    from workbench.ops.variants import ensure_default_variants
    from workbench.search.run import resolve_models
    from workbench.search.spec import spec_from_dict

    variants = ensure_default_variants()
    base = variants[0].with_name(variants[0].name.rsplit("-variant-", 1)[0])
    layers = ModelDir(base).num_layers
    rounded = [rounded_copy(p, tmp_path / "rounded" / p.name) for p in [base, *variants]]
    runs = {"float32": spec(base, variants, "float32"), "bfloat16": spec(base, variants, "bfloat16"),
            "float32_rounded": spec(rounded[0], rounded[1:], "float32")}
    results = {}
    for name, data in runs.items():
        home = fresh_home(tmp_path / f"home-{name}", models_dir())
        r = probe("search", {"spec": data, "layers": layers, "candidates": N_CANDIDATES}, home)
        plan = search_plan(resolve_models(spec_from_dict(data)), "cpu").total("cpu")
        r["plan"] = plan
        results[name] = r
        emit(run=name, growth_mb=round(r["growth"] / MB, 1), peak_rss_mb=round(r["peak"] / MB, 1),
             plan_mb=round(plan / MB, 1), plan_over_measured=round(plan / r["growth"], 3),
             candidates=N_CANDIDATES, seconds=round(r["seconds"], 2), merge_s=round(r["merge_s"], 2),
             candidates_per_min=round(60 * N_CANDIDATES / r["seconds"], 2), setup_s=round(r["setup_s"], 2))
    f32, bf16, rnd = results["float32"], results["bfloat16"], results["float32_rounded"]
    diff = max(abs(a - b) for a, b in zip(bf16["scores"], rnd["scores"]))
    growth_ratio, peak_ratio = bf16["growth"] / f32["growth"], bf16["peak"] / f32["peak"]
    cpm_ratio = f32["seconds"] / bf16["seconds"]
    emit(growth_ratio_bf16_f32=round(growth_ratio, 3), peak_ratio_bf16_f32=round(peak_ratio, 3),
         meets_0_55=growth_ratio <= 0.55, cpm_ratio_bf16_f32=round(cpm_ratio, 3),
         max_score_diff_bf16_vs_rounded=diff, sources="SmolLM2-135M-Instruct + variant-a, variant-b (seeded)")

    recipe = recipe_from_dict({"merge_method": "ties", "base_model": str(base), "parameters": {"normalize": True},
                               "models": [{"model": str(v), "parameters": {"weight": 0.5, "density": 0.5}}
                                          for v in variants]})
    (tmp_path / "r.yml").write_text(dump_recipe(recipe))
    m = probe("merge", {"recipe": str(tmp_path / "r.yml"), "out": str(tmp_path / "merged")},
              fresh_home(tmp_path / "home-merge", models_dir()))
    mplan = merge_plan(recipe).total("cpu")
    emit("merge_memory", models=3, method="ties", growth_mb=round(m["growth"] / MB, 1),
         peak_rss_mb=round(m["peak"] / MB, 1), plan_mb=round(mplan / MB, 1),
         plan_over_measured=round(mplan / m["growth"], 3))

    rec = recovery_figure(tmp_path)

    assert bf16["scores"] == rnd["scores"]
    assert bf16["growth"] < f32["growth"]
    assert cpm_ratio >= 0.9, cpm_ratio
    for name, r in results.items():
        assert abs(r["plan"] - r["growth"]) <= 0.25 * r["growth"], (name, r["plan"] / MB, r["growth"] / MB)
    assert abs(mplan - m["growth"]) <= 0.25 * m["growth"], (mplan / MB, m["growth"] / MB)
    assert abs(rec["plan"] - rec["growth"]) <= 0.25 * rec["growth"], (rec["plan"] / MB, rec["growth"] / MB)


def recovery_figure(tmp_path: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from workbench.home import models_dir
    from workbench.memory_plan import recovery_plan
    from workbench.quant.config import quant_config_from_dict
    from workbench.quant.model import quantize_model, save_quantized
    from workbench.quant.options import RecoverOptions
    from workbench.models.default_model import prepare_default

    src = tmp_path / "llama64"
    src.mkdir()
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)   # SmolLM2's vocabulary
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    cfg.save_pretrained(src)
    model.save_pretrained(src)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(prepare_default()).save_pretrained(src)   # a real tokenizer for the corpus
    qcfg = quant_config_from_dict({"bits": 2, "group_size": 16, "lora": {"rank": 8}})
    quantize_model(model, qcfg)
    qdir = save_quantized(model, tmp_path / "llama64-q", src, qcfg)
    opts = {"steps": 6, "block_steps": 2, "seq_len": 128, "batch_size": 2, "max_tokens": 4096,
            "block_tokens": 1024, "top_k": 16}
    r = probe("recover", {"qdir": str(qdir), "teacher": str(src), "out": str(tmp_path / "llama64-r"), "opts": opts},
              fresh_home(tmp_path / "home-recover", models_dir()))
    r["plan"] = recovery_plan(qdir, src, RecoverOptions(**opts), "cpu").total("cpu")
    emit("recovery_memory", model="llama-63MB (seeded, SmolLM2 vocabulary; 2-bit, LoRA rank 8)", growth_mb=round(r["growth"] / MB, 1),
         peak_rss_mb=round(r["peak"] / MB, 1), plan_mb=round(r["plan"] / MB, 1),
         plan_over_measured=round(r["plan"] / r["growth"], 3))
    return r

