"""Exported GGUF files run in llama.cpp, and their perplexity matches ours (SmolLM2-135M-Instruct).

Run by `make bench`, which builds llama-cpp-python into the venv (see the Makefile: from source, AMX
off: on this VM llama.cpp's AMX path crashes every model, the shipped Q4_1 GGUF included). For each
quantization config (a uniform 4-bit one without and with rank-16 adapters, ternary with rank 16, a
2/4-bit mix; ``BENCH_GGUF_CONFIGS`` picks YAML files instead, e.g. a quantization search run's
``point-K.yml``) the model is quantized, exported with ``workbench export --format gguf`` (adapters
as OUT.lora.gguf, loaded by llama.cpp as a LoRA), and both tools score the same token windows of the
held-out text (`zoo-perplexity`'s heldout split, 8 x 256 tokens, no BOS): ours with the compressed
directory, llama.cpp with the GGUF. One JSON line per config:

    {"bench": "gguf", "config": ..., "gguf_bpw": ..., "total_bpw": ..., "lora_bytes": ..., "ours_ppl": ...,
     "llama_cpp_ppl": ..., "ratio": ...}

(``gguf_bpw``: the model file's linear weights, from their bytes; ``total_bpw``: with the whole adapter file's
bytes added, over the same weights.)

Target: |log(llama.cpp ppl / ours)| <= 0.02 where our perplexity is under 1,000 (llama.cpp's Q4 dot
products round the activations to 8 bits; measured 0.0003 without adapters, 0.006 with them);
above that (unrecovered 2-bit / ternary models, near-flat distributions that amplify any rounding)
only that llama.cpp loads and runs the file, with the ratio printed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by `make bench`")

RECIPES = Path(__file__).parents[2] / "recipes"
CONFIGS = {
    "4bit": "bits: 4\ngroup_size: 64\nmethod: hqq\nskip: [lm_head]\n",
    "4bit-r16": "bits: 4\ngroup_size: 64\nmethod: hqq\nskip: [lm_head]\nlora: {rank: 16, alpha: 16, init: svd}\n",
    "ternary-r16": (RECIPES / "ternary.yml").read_text(),
    "mixed-2bit-4bit": (RECIPES / "mixed-2bit-4bit.yml").read_text(),
}
WINDOW, WINDOWS = 256, 8


def heldout_windows(tok) -> list[list[int]]:
    from workbench.eval.taskfile import load_task

    task = load_task("zoo-perplexity")
    ids: list[int] = []
    for item in task.split_items("heldout"):
        ids += tok(task.document_text(item), add_special_tokens=False)["input_ids"]
    return [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(WINDOWS)]


def ours_ppl(model, windows) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            lp = torch.log_softmax(model(torch.tensor([w])).logits[0, :-1].double(), -1)
            nll -= float(lp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum())
            n += len(w) - 1
    return math.exp(nll / n)


def llama_cpp_ppl(gguf: Path, lora: Path | None, windows) -> float:
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(gguf), lora_path=str(lora) if lora else None, n_ctx=2 * WINDOW,
                          n_batch=2 * WINDOW, logits_all=True, n_threads=os.cpu_count(), verbose=False)
    nll, n = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        s = np.asarray(llm.scores[:len(w)], dtype=np.float64)
        s -= s.max(-1, keepdims=True)
        lp = s - np.log(np.exp(s).sum(-1, keepdims=True))
        nll -= float(lp[np.arange(len(w) - 1), np.asarray(w[1:])].sum())
        n += len(w) - 1
    return math.exp(nll / n)


def configs(tmp: Path) -> dict[str, Path]:
    given = os.environ.get("BENCH_GGUF_CONFIGS")
    if given:
        return {Path(p).stem: Path(p) for p in given.split(",")}
    out = {}
    for name, text in CONFIGS.items():
        out[name] = tmp / f"{name}.yml"
        out[name].write_text(text)
    return out


def test_exported_gguf_runs_in_llama_cpp_with_our_perplexity(tmp_path):
    from workbench.models.default_model import prepare_default
    from workbench.models.loader import load_model

    base = prepare_default()
    windows = heldout_windows(load_model(base)[1])
    cli = [sys.executable, "-m", "workbench.cli"]
    rows = []
    for name, cfg in configs(tmp_path).items():
        qdir, gguf = tmp_path / name, tmp_path / f"{name}.gguf"
        subprocess.run([*cli, "quantize", str(base), "--config", str(cfg), "--out", str(qdir), "--no-eval",
                        "--no-progress"], check=True)
        report = json.loads(subprocess.run([*cli, "export", str(qdir), "--format", "gguf", "--out", str(gguf)],
                                           check=True, capture_output=True, text=True).stdout)
        lora = gguf.with_name(gguf.stem + ".lora.gguf")
        ours = ours_ppl(load_model(qdir)[0], windows)
        theirs = llama_cpp_ppl(gguf, lora if lora.is_file() else None, windows)
        row = {"bench": "gguf", "config": name, "gguf_bpw": report["bits_per_weight"], "types": report["types"],
               "lora_bytes": lora.stat().st_size if lora.is_file() else 0, "gguf_bytes": gguf.stat().st_size,
               "total_bpw": round((report["linear_bytes"] + (lora.stat().st_size if lora.is_file() else 0)) * 8
                                  / report["linear_weights"], 3),
               "ours_ppl": round(ours, 4), "llama_cpp_ppl": round(theirs, 4),
               "ratio": round(theirs / ours, 4), "tokens": WINDOWS * (WINDOW - 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    off = [r for r in rows if r["ours_ppl"] < 1000 and abs(math.log(r["ratio"])) > 0.02]
    assert not off, off
