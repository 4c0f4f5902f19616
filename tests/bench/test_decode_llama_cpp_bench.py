"""Decode and prefill speed of the quantized SmolLM2-135M-Instruct through the workbench (its CPU
kernels, the default int8 mode) against llama.cpp (llama-cpp-python) on the same model exported to
GGUF, side by side in one run (`make bench`, pytest -s).

For each config (recipes/2bit.yml and recipes/ternary.yml: group 64, rank-16 adapters; with
``embeddings: bfloat16``, so our tied embeddings / output head take the bytes of the GGUF's F16 one:
in float32 its 113 MB are half of a decode step's reads) the model is quantized (`workbench quantize`) and exported (`workbench export --format gguf`: ternary g64 as Q4_0
blocks holding our values, 2-bit as Q4_1; the adapters as OUT.lora.gguf, which llama.cpp loads), so
both sides run the same weights and adapters. Same threads (torch's), same chat prompt, greedy
decoding of BENCH_DECODE_TOKENS (64) tokens, the best of BENCH_DECODE_REPEATS (3) runs; prefill:
one forward pass over 256 tokens of held-out text, the best of 3. The two sides' runs alternate
(after a warm-up run each), so a burst of other work on shared CPUs slows both, not one side's
three runs. BENCH_CONFIGS (comma-separated: 2bit, ternary) picks configs. One JSON line per config:

    {"bench": "decode_vs_llama_cpp", "config": "ternary", "gguf_types": ..., "ours_decode_tok_s": ...,
     "llama_cpp_decode_tok_s": ..., "decode_ratio": ..., "ours_prefill_tok_s": ..., "llama_cpp_prefill_tok_s": ...,
     "prefill_ratio": ..., "threads": ...}

Target (issue #21): decode_ratio >= 0.5 for both configs (asserted unless BENCH_NO_TARGETS=1); the
prefill ratio is reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by `make bench`")

RECIPES = Path(__file__).parents[2] / "recipes"
CONFIGS = {"2bit": RECIPES / "2bit.yml", "ternary": RECIPES / "ternary.yml"}
PREFILL = 256
TARGET = 0.5


def _repeats() -> int:
    return int(os.environ.get("BENCH_DECODE_REPEATS", "3"))


def _configs() -> list[str]:
    """``BENCH_CONFIGS`` (comma-separated names of CONFIGS), default all."""
    names = [c.strip() for c in os.environ.get("BENCH_CONFIGS", ",".join(CONFIGS)).split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise ValueError(f"BENCH_CONFIGS: unknown config {', '.join(unknown)}; expected some of {', '.join(CONFIGS)}")
    return names


def ours_once(model, prompt: list[int], n: int, prefill_ids: list[int]) -> tuple[float, float]:
    """One decode run and one prefill pass of our model: (decode tokens/s, prefill tokens/s)."""
    ids = torch.tensor([prompt])
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    decode = n / (time.perf_counter() - t)
    x = torch.tensor([prefill_ids])
    t = time.perf_counter()
    with torch.no_grad():
        model(x)
    return decode, len(prefill_ids) / (time.perf_counter() - t)


def llama_cpp_model(gguf: Path, lora: Path | None, n: int, threads: int):
    return llama_cpp.Llama(model_path=str(gguf), lora_path=str(lora) if lora else None, n_ctx=2 * PREFILL + n,
                           n_batch=2 * PREFILL, n_threads=threads, n_threads_batch=threads, verbose=False)


def llama_cpp_once(llm, prompt: list[int], n: int, prefill_ids: list[int]) -> tuple[float, float]:
    """One decode run and one prefill pass through llama.cpp, greedy as ours: (decode, prefill) tokens/s."""
    import numpy as np

    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    for _ in range(n):  # greedy, as ours: the argmax of the last logits
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    decode = n / (time.perf_counter() - t)
    llm.reset()
    t = time.perf_counter()
    llm.eval(prefill_ids)
    return decode, len(prefill_ids) / (time.perf_counter() - t)


def interleaved_best(runs: dict[str, Callable[[], tuple[float, float]]], repeats: int) -> dict[str, tuple[float, float]]:
    """The best (decode, prefill) of `repeats` runs of each side, the sides alternating run by run (the
    first side rotating), so a burst of other work on the shared CPUs slows both sides, not one."""
    names = list(runs)
    for fn in runs.values():  # warm: first-touch pages, kernel builds, oneDNN's choices
        fn()
    best = {name: (0.0, 0.0) for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            d, p = runs[name]()
            best[name] = (max(best[name][0], d), max(best[name][1], p))
    return best


def test_decode_speed_against_llama_cpp(tmp_path):
    from workbench.eval.taskfile import load_task
    from workbench.models.default_model import prepare_default
    from workbench.models.loader import load_model

    base = prepare_default()
    _, tok = load_model(base)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    task = load_task("zoo-perplexity")
    text_ids: list[int] = []
    for item in task.split_items("heldout"):
        text_ids += tok(task.document_text(item), add_special_tokens=False)["input_ids"]
        if len(text_ids) >= PREFILL:
            break
    prefill_ids = text_ids[:PREFILL]
    n = int(os.environ.get("BENCH_DECODE_TOKENS", "64"))
    threads = torch.get_num_threads()
    cli = [sys.executable, "-m", "workbench.cli"]
    env = {**os.environ, "WORKBENCH_KERNELS": os.environ.get("WORKBENCH_KERNELS", "1")}
    misses = []
    for name in _configs():
        recipe = CONFIGS[name]
        qdir, gguf, cfg = tmp_path / name, tmp_path / f"{name}.gguf", tmp_path / f"{name}.yml"
        cfg.write_text(recipe.read_text() + "\nembeddings: bfloat16\n")
        subprocess.run([*cli, "quantize", str(base), "--config", str(cfg), "--out", str(qdir), "--no-eval",
                        "--no-progress"], check=True, env=env)
        report = json.loads(subprocess.run([*cli, "export", str(qdir), "--format", "gguf", "--out", str(gguf)],
                                           check=True, capture_output=True, text=True, env=env).stdout)
        lora = gguf.with_name(gguf.stem + ".lora.gguf")
        model = load_model(qdir)[0]
        llm = llama_cpp_model(gguf, lora if lora.is_file() else None, n, threads)
        best = interleaved_best({"ours": lambda: ours_once(model, prompt, n, prefill_ids),
                                 "llama_cpp": lambda: llama_cpp_once(llm, prompt, n, prefill_ids)}, _repeats())
        (ours_d, ours_p), (theirs_d, theirs_p) = best["ours"], best["llama_cpp"]
        del llm
        row = {"bench": "decode_vs_llama_cpp", "config": name, "gguf_types": report.get("types"),
               "lora": lora.is_file(), "kernels": env["WORKBENCH_KERNELS"],
               "ours_decode_tok_s": round(ours_d, 2), "llama_cpp_decode_tok_s": round(theirs_d, 2),
               "decode_ratio": round(ours_d / theirs_d, 3), "ours_prefill_tok_s": round(ours_p, 1),
               "llama_cpp_prefill_tok_s": round(theirs_p, 1), "prefill_ratio": round(ours_p / theirs_p, 3),
               "prefill_tokens": len(prefill_ids), "decode_tokens": n, "threads": threads,
               "load_avg_1m": round(os.getloadavg()[0], 2)}
        print(json.dumps(row), flush=True)
        if ours_d < TARGET * theirs_d:
            misses.append(f"{name}: {ours_d:.1f} vs llama.cpp {theirs_d:.1f} tokens/s")
    if os.environ.get("BENCH_NO_TARGETS") != "1":
        assert not misses, "; ".join(misses)
