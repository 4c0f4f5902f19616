"""Quantization benchmark on SmolLM2-135M: our quantizers against the `hqq` package, and recovery.

Run by `make bench` (pytest -s). Held-out perplexity is the `heldout` split of `zoo-perplexity`
(GPL-3 and MPL-2.0 as shipped by the OS, never used for calibration). One JSON line per figure:

    {"bench": "quant", "what": "ptq", "tool": "workbench"|"hqq", "format": "2bit", "group_size": 64,
     "bits_per_weight": ..., "ppl": ..., "quantize_s": ...}
    {"bench": "quant", "what": "recover", "format": ..., "rank": ..., "minutes": ..., "ppl_before": ...,
     "ppl_after": ..., "ppl_float": ..., "ratio_to_float": ...}

The post-training rows need no training and take about two minutes. Recovery runs `workbench
quantize` + `workbench recover` per format for BENCH_RECOVER_MINUTES (default 30, the issue's
budget; 0 skips them) with BENCH_RECOVER_THREADS threads (default 1, so two formats could share
the machine); BENCH_RECOVER_FORMATS picks them (default "2bit,ternary"). Targets (asserted after
the figures print): 2-bit at <= 2.6 bits per weight (base) within 1.5x of the float perplexity with
rank-64 adapters, and ternary within 3x with rank 16, when the full 30 minutes were given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from workbench.eval.evaluator import evaluate

TASK = "zoo-perplexity"
RECIPES = Path(__file__).parents[2] / "recipes"
# format -> (recipe, group size, LoRA rank): the ranks at which the targets were reached
FORMATS = {"2bit": ("2bit.yml", 64, 64), "ternary": ("ternary.yml", 64, 16)}


def _emit(**row) -> None:
    print(json.dumps({"bench": "quant", **row}), flush=True)


def _ppl(model, tok) -> float:
    with torch.no_grad():
        return evaluate(model, tok, TASK, split="heldout")[TASK].metrics["ppl"]


@pytest.fixture(scope="module")
def smollm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.models.default_model import prepare_default

    path = Path(os.environ.get("BENCH_MODEL_DIR") or prepare_default())
    return path, AutoTokenizer.from_pretrained(path), lambda: AutoModelForCausalLM.from_pretrained(path).eval()


def test_post_training_quantization_against_hqq(smollm):
    from workbench.quant.config import quant_config_from_dict
    from workbench.quant.model import quantize_model, size_report

    path, tok, load = smollm
    ppl_float = _ppl(load(), tok)
    _emit(what="ptq", tool="float32", format="float32", ppl=ppl_float)
    rows = {}
    for fmt, bits, group, method in [("2bit", 2, 64, "hqq"), ("2bit", 2, 64, "rtn"), ("ternary", 1.58, 64, "lsq"),
                                     ("ternary", 1.58, 64, "absmean"), ("4bit", 4, 64, "hqq")]:
        model = load()
        cfg = quant_config_from_dict({"bits": bits, "group_size": group, "method": method})
        t = time.perf_counter()
        quantize_model(model, cfg)
        seconds = time.perf_counter() - t
        rows[(fmt, method)] = _ppl(model, tok)
        _emit(what="ptq", tool="workbench", format=fmt, method=method, group_size=group,
              bits_per_weight=round(size_report(model)["bits_per_weight"], 4), ppl=rows[(fmt, method)],
              quantize_s=round(seconds, 2))
    hqq = pytest.importorskip("hqq.core.quantize", reason="the hqq package is installed by `make bench`")
    for nbits in (2, 4):
        model = load()
        t = time.perf_counter()
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                parent, _, child = name.rpartition(".")
                cfg = hqq.BaseQuantizeConfig(nbits=nbits, group_size=64, axis=1)
                setattr(model.get_submodule(parent), child,
                        hqq.HQQLinear(module, cfg, compute_dtype=torch.float32, device="cpu"))
        seconds = time.perf_counter() - t
        ppl = _ppl(model, tok)
        _emit(what="ptq", tool="hqq", format=f"{nbits}bit", method="hqq", group_size=64,
              bits_per_weight=nbits + 32 / 64, ppl=ppl, quantize_s=round(seconds, 2))
        if nbits == 2:
            # Same algorithm, same group size: ours should land in the same place (within 2x either way).
            assert 0.5 < rows[("2bit", "hqq")] / ppl < 2.0


@pytest.mark.timeout(3 * 3600)
def test_recovery_within_the_cpu_budget(smollm, tmp_path):
    minutes = float(os.environ.get("BENCH_RECOVER_MINUTES", "30"))
    if minutes <= 0:
        pytest.skip("BENCH_RECOVER_MINUTES=0")
    path, tok, load = smollm
    ppl_float = _ppl(load(), tok)
    threads = os.environ.get("BENCH_RECOVER_THREADS", "1")
    results = {}
    for fmt in os.environ.get("BENCH_RECOVER_FORMATS", "2bit,ternary").split(","):
        recipe, group, rank = FORMATS[fmt]
        config = yaml.safe_load((RECIPES / recipe).read_text())
        config["lora"].update(rank=rank, alpha=rank)
        (tmp_path / recipe).write_text(yaml.safe_dump(config))
        q, r = tmp_path / f"{fmt}-q", tmp_path / f"{fmt}-r"
        cli = [sys.executable, "-m", "workbench.cli"]
        subprocess.run([*cli, "quantize", str(path), "--config", str(tmp_path / recipe), "--out", str(q),
                        "--no-progress", "--no-eval"], check=True)
        subprocess.run([*cli, "recover", str(q), "--teacher", str(path), "--out", str(r), "--time-budget",
                        str(minutes), "--steps", "100000", "--max-tokens", "32768", "--block-tokens", "8192",
                        "--threads", threads, "--no-progress", "--json", str(tmp_path / f"{fmt}.json")], check=True)
        rep = json.loads((tmp_path / f"{fmt}.json").read_text())
        results[fmt] = rep
        _emit(what="recover", format=fmt, group_size=group, rank=rank, minutes=round(rep["seconds"] / 60, 2),
              steps=rep["steps"], threads=int(threads), bits_per_weight=round(rep["bits_per_weight"], 4),
              bits_per_weight_with_adapters=round(rep["bits_per_weight_with_adapters"], 4),
              ppl_float=ppl_float, ppl_before=rep["ppl_before"], ppl_after=rep["ppl_after"],
              ratio_to_float=rep["ppl_after"] / ppl_float)
    if minutes >= 30:
        if "2bit" in results:
            assert results["2bit"]["bits_per_weight"] <= 2.6
            assert results["2bit"]["ppl_after"] <= 1.5 * ppl_float
        if "ternary" in results:
            assert results["ternary"]["ppl_after"] <= 3 * ppl_float
