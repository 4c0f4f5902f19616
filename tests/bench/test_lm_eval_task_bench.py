"""lm-eval tasks (issue 18): the workbench scoring an lm-eval task against ``lm_eval.simple_evaluate``.

On SmolLM2-135M-Instruct (float32, the same model object for both), two local lm-eval tasks over
real text (license texts the OS ships): ``bench_mc``, multiple choice (the true continuation of
a GPL-3 passage among three taken from elsewhere), and ``bench_gen``, generate_until (the rest of
the sentence an Apache-2.0 passage breaks off in: stopped at the sentence's end or a newline, at
most 24 tokens; the answers' lengths vary, as in gsm8k-like tasks).

    ours:   load_task("lm_eval:NAME") + evaluate(split="all")   (lm-eval builds the requests)
    theirs: simple_evaluate(HFLM(pretrained=<the model>, batch_size=32), tasks=[NAME])

Interleaved ours, theirs, ours, theirs; the least of each. One JSON line per run and per task:

    {"bench": "lm_eval_tasks", "task", "docs", "ours_s", "lm_eval_s", "speedup", "ours_warm_s",
     "metrics_ours", "metrics_lm_eval", "equal"}

``ours_warm_s`` is a search's case: the requests already built (they are cached per tokenizer).
Targets, asserted after every figure is printed: equal metrics; speedup >= 3 (multiple choice)
and >= 1.5 (generate_until). Threads: 2 (BENCH_THREADS).
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import pytest

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
MC_DOCS = int(os.environ.get("BENCH_LM_EVAL_MC_DOCS", "300"))
GEN_DOCS = int(os.environ.get("BENCH_LM_EVAL_GEN_DOCS", "64"))
TARGETS = {"bench_mc": 3.0, "bench_gen": 1.5}
TASKS = [t for t in os.environ.get("BENCH_LM_EVAL_TASKS", "bench_mc,bench_gen").split(",") if t]
LICENSES = Path("/usr/share/common-licenses")


def emit(**fields) -> None:
    print(json.dumps({"bench": "lm_eval_tasks", **fields}), flush=True)


def _words(name: str) -> list[str]:
    return re.sub(r"\s+", " ", (LICENSES / name).read_text()).split(" ")


def write_tasks(d: Path) -> Path:
    from workbench.eval.bench import license_mc_items

    rng = random.Random(0)
    rows = [{"question": it["context"], "choices": it["choices"], "label": it["gold"]}
            for it in license_mc_items(MC_DOCS, rng)]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    words = _words("Apache-2.0")
    gen = []
    for _ in range(GEN_DOCS):
        start = rng.randrange(0, len(words) - 60)
        n_ctx = rng.randint(20, 40)
        gen.append({"passage": " ".join(words[start:start + n_ctx]),
                    "answer": " ".join(words[start + n_ctx:start + n_ctx + 2])})
    (d / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    tasks = d / "tasks"
    tasks.mkdir()
    (tasks / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (tasks / "bench_gen.yaml").write_text(
        f"task: bench_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: \"{{passage}}\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\".\", \"\\n\"]\n  do_sample: false\n"
        "  max_gen_toks: 24\nfilter_list:\n  - name: two_words\n    filter:\n"
        "      - function: regex\n        regex_pattern: \"^\\\\s*(\\\\S+\\\\s+\\\\S+)\"\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n")
    return tasks


def test_lm_eval_tasks_against_simple_evaluate(tmp_path):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval comes with the workbench[lm-eval] extra")
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.eval.evaluator import evaluate
    from workbench.eval.lm_eval_tasks import LmEvalOptions
    from workbench.eval.taskfile import load_task
    from workbench.models.default_model import prepare_default

    model_dir = prepare_default()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    include = write_tasks(tmp_path)
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    emit(setup={"model": str(model_dir), "lm_eval": lm_eval.__version__, "threads": THREADS,
                "mc_docs": MC_DOCS, "gen_docs": GEN_DOCS})

    def ours(name: str, limit: int | None = None):
        t0 = time.perf_counter()
        task = load_task(f"lm_eval:{name}", LmEvalOptions(include_path=(str(include),)))
        (r,) = evaluate(model, tok, task, split="all", batch_size=32, threads=THREADS, limit=limit).values()
        return task, r, time.perf_counter() - t0

    def theirs(name: str):
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=32)
        manager = TaskManager(include_path=str(include), include_defaults=False)
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, bootstrap_iters=0)
        secs = time.perf_counter() - t0
        torch.set_num_threads(THREADS)
        return out["results"][name], secs

    failures = []
    for name in TASKS:
        ours(name, limit=2)  # warm-up: lm-eval's dataset cache, the first forward
        runs = []
        for _ in range(2):
            task, r, cold = ours(name)
            ref, lm_s = theirs(name)
            runs.append((cold, lm_s))
            emit(task=name, run=len(runs), ours_s=round(cold, 3), lm_eval_s=round(lm_s, 3))
        t0 = time.perf_counter()   # a search's case: the same task object, its requests built already
        evaluate(model, tok, task, split="all", batch_size=32, threads=THREADS)
        warm = time.perf_counter() - t0
        mine = {k: round(float(v), 9) for k, v in r.metrics.items() if k != "score"}
        refs = {k.replace(",none", ""): round(float(v), 9) for k, v in ref.items()
                if "," in k and "_stderr" not in k}
        cold, lm_s = min(x[0] for x in runs), min(x[1] for x in runs)
        line = dict(task=name, docs=r.items, ours_s=round(cold, 3), ours_warm_s=round(warm, 3),
                    lm_eval_s=round(lm_s, 3), speedup=round(lm_s / cold, 2), speedup_warm=round(lm_s / warm, 2),
                    metrics_ours=mine, metrics_lm_eval=refs, equal=mine == refs, score=round(r.metrics["score"], 4))
        emit(**line)
        if not line["equal"]:
            failures.append(f"{name}: metrics {mine} != lm-eval's {refs}")
        if line["speedup"] < TARGETS[name]:
            failures.append(f"{name}: speedup {line['speedup']} < {TARGETS[name]}")
    torch.set_num_threads(old)
    assert not failures, "; ".join(failures)
