"""End-to-end decoding of SmolLM2-135M through `QuantLinear`: kernels against the pure-torch path and
against the float32 model, side by side in one run (`make bench`, pytest -s).

Greedy decoding, batch 1, BENCH_DECODE_TOKENS (default 64) new tokens after a short chat prompt,
torch's default threads. Each model decodes BENCH_DECODE_REPEATS (default 3) times; the figure is
the best tokens/s. Paths: ``torch`` (WORKBENCH_KERNELS=0), ``exact`` (the float kernels) and
``kernels`` (the default: int8 activations, integer dot products). One JSON line per figure:

    {"bench": "decode", "model": "float32"|"2bit"|"ternary", "path": "kernels"|"exact"|"torch",
     "tokens_per_s": ..., "speedup_vs_fp32": ..., "same_tokens_as_torch_path": true, "same_prefix": ...}

Each format runs twice: with the float32 embeddings / output head of the source model, and with them in
bfloat16 (`embeddings: bfloat16` in the quantization config; the head is 113 MB of float32 reads per
token for SmolLM2). Targets (asserted after printing): the kernel path gives the pure-torch path's
tokens; tokens/s of the 2-bit and ternary models with kernels >= 2x the float32 model's. The exact path gives
the pure-torch path's tokens; the int8 path's tokens are reported (``same_prefix``: how many of the
first tokens agree), not asserted: int8 activations move the logits by about 0.5%, which may flip a
near-tie.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).parents[2] / "recipes"


def _decode(model, ids, n):
    best, out = 0.0, None
    for _ in range(int(os.environ.get("BENCH_DECODE_REPEATS", "3"))):
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        best = max(best, n / (time.perf_counter() - t))
    return out, best


def test_decode_speed_kernels_vs_torch_vs_float(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.models.default_model import prepare_default
    from workbench.quant.config import load_quant_config
    from workbench.quant.model import quantize_model

    path = Path(os.environ.get("BENCH_MODEL_DIR") or prepare_default())
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    n = int(os.environ.get("BENCH_DECODE_TOKENS", "64"))
    _, fp32 = _decode(AutoModelForCausalLM.from_pretrained(path).eval(), ids, n)
    print(json.dumps({"bench": "decode", "model": "float32", "path": "dense", "tokens_per_s": round(fp32, 2),
                      "threads": torch.get_num_threads()}), flush=True)
    results = {}
    variants = [(f"{fmt}{suffix}", recipe, emb) for fmt, recipe in (("2bit", "2bit.yml"), ("ternary", "ternary.yml"))
                for suffix, emb in (("", "float32"), ("+bf16-embeddings", "bfloat16"))]
    for name, recipe, embeddings in variants:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        cfg = load_quant_config(RECIPES / recipe)
        cfg.embeddings = embeddings  # the tied embeddings / output head in bfloat16: half the bytes per token
        quantize_model(model, cfg)
        outs = {}
        for label, flag in (("torch", "0"), ("exact", "exact"), ("kernels", "1")):
            monkeypatch.setenv("WORKBENCH_KERNELS", flag)
            outs[label], speed = _decode(model, ids, n)
            results[(name, label)] = speed
            new, ref = outs[label][0, ids.shape[1]:], outs["torch"][0, ids.shape[1]:]
            differ = (new != ref).nonzero()
            print(json.dumps({"bench": "decode", "model": name, "path": label, "tokens_per_s": round(speed, 2),
                              "speedup_vs_fp32": round(speed / fp32, 3),
                              "same_tokens_as_torch_path": bool(torch.equal(outs[label], outs["torch"])),
                              "same_prefix": int(differ[0, 0]) if len(differ) else len(ref)}), flush=True)
        assert torch.equal(outs["exact"], outs["torch"])
    if os.environ.get("BENCH_NO_TARGETS") != "1":
        for name in ("2bit", "ternary"):
            best = max(results[(name, "kernels")], results[(name + "+bf16-embeddings", "kernels")])
            assert best >= 2 * fp32, (name, best, fp32)
