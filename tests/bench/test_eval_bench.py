"""Evaluator speed (issue 3): workbench's evaluator against lm-evaluation-harness and a naive loop.

Model: SmolLM2-135M-Instruct (the default model), float32, on the CPU. Tasks: the built-in skill
tasks zoo-arith, zoo-french and zoo-arith-french (multiple_choice, chat template), split "search".

Per task and thread count, on the first BENCH_EVAL_LIMIT items of the split:

* workbench: ``evaluate(model, tok, [task], split="search", limit=..., threads=...)``;
* lm-eval: ``HFLM(pretrained=<the same model object>, tokenizer=tok, batch_size=32).loglikelihood``
  on Instances built from workbench's own samples (``log_samples=True``): the rendered chat
  context and the continuation strings, so both tools score exactly the same requests;
* naive: one full forward per (item, choice), batch 1 (``workbench.eval.bench.naive``), on the
  first BENCH_EVAL_NAIVE_LIMIT items only (it is slow): compare its per-item rate.

The machine is shared, so the tools run interleaved: workbench, lm-eval, naive, workbench again;
workbench's figure is the mean of its two runs, which bracket the peers'. One JSON line per
figure, then a ratio line per task and thread count:

    {"bench": "eval", "task": ..., "tool": "workbench"|"lm-eval"|"naive", "threads": 1, "items": N,
     "requests": R, "tokens": T, "seconds": s, "items_per_s": ..., "tokens_per_s": ..., "acc": ...}
    {"bench": "eval", "task": ..., "threads": 1, "speedup_vs_lm_eval": ..., "speedup_vs_naive": ...,
     "max_ll_diff": ..., "max_ll_diff_vs_naive": ..., "acc_workbench": ..., "acc_lm_eval": ...}
    {"bench": "eval", "threads": 1, "fitness_seconds": ..., "target_seconds": 10, ...}

``tokens`` are request tokens (context + continuation tokens per request, what the plain loops
push through the model), items_per_s and tokens_per_s are rates, so subsets compare. The fitness
line times one candidate's objective: all search splits of the three skill tasks, once, with bfloat16
weights (as the search holds its resident model) and, for reference, float32.

Targets, asserted after every figure is printed: speedup_vs_lm_eval >= 3, max_ll_diff <= 1e-4,
equal acc, fitness_seconds (bfloat16 weights) <= 10. Knobs: BENCH_EVAL_LIMIT (items per task, 25),
BENCH_EVAL_NAIVE_LIMIT (8), BENCH_EVAL_THREADS ("2", this machine's cores; "1,2" adds a 1-thread
pass), BENCH_EVAL_FITNESS_THREADS (the first of BENCH_EVAL_THREADS). Run it on a quiet machine:
threads that wait on a busy core make every tool slower, and not by the same factor. lm-eval comes with the bench extra (`make bench`).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest

LIMIT = int(os.environ.get("BENCH_EVAL_LIMIT", "25"))
NAIVE_LIMIT = int(os.environ.get("BENCH_EVAL_NAIVE_LIMIT", "8"))
THREADS = [int(x) for x in os.environ.get("BENCH_EVAL_THREADS", "2").split(",") if x.strip()]
FITNESS_THREADS = int(os.environ.get("BENCH_EVAL_FITNESS_THREADS", str(THREADS[0])))
TASKS = ["zoo-arith", "zoo-french", "zoo-arith-french"]
BATCH_SIZE = 32
SPEEDUP_TARGET = 3.0
LL_TOL = 1e-4
FITNESS_TARGET_S = 10.0


def emit(**fields) -> None:
    print(json.dumps({"bench": "eval", **fields}), flush=True)


def rate(n: float, secs: float) -> float:
    return round(n / secs, 2) if secs > 0 else float("inf")


def lm_eval_acc(samples: list[dict], lls: list[float]) -> float:
    """acc from per-request log-likelihoods: argmax over each item's choices equals gold."""
    by_item: dict[int, list[tuple[int, float, int]]] = defaultdict(list)
    for s, ll in zip(samples, lls):
        by_item[s["item"]].append((s["choice"], ll, s["gold"]))
    hits = []
    for rows in by_item.values():
        rows.sort()
        best = max(range(len(rows)), key=lambda i: rows[i][1])
        hits.append(float(rows[best][0] == rows[0][2]))
    return sum(hits) / len(hits)


@pytest.mark.timeout(1800)
def test_evaluator_against_lm_eval_and_naive():
    pytest.importorskip("lm_eval", reason="lm-eval is installed by `make bench` (the bench extra)")
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import workbench.tasks
    from workbench.eval import load_task
    from workbench.eval.bench import naive
    from workbench.eval.evaluator import evaluate
    from workbench.eval.requests import prepare
    from workbench.models.default_model import prepare_default

    model_dir = prepare_default()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model_bf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    task_dir = Path(workbench.tasks.__file__).parent
    tasks = {name: load_task(task_dir / f"{name}.yml") for name in TASKS}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(THREADS[0])
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=BATCH_SIZE)  # the same in-memory model
    import lm_eval
    emit(setup={"model": str(model_dir), "lm_eval": getattr(lm_eval, "__version__", "?"), "torch": torch.__version__,
                "limit": LIMIT, "naive_limit": NAIVE_LIMIT, "threads": THREADS, "batch_size": BATCH_SIZE})

    # Untimed: each task's requests (token ids for the naive loop and the token counts; workbench's
    # rendered context / continuation strings for lm-eval) and a warm-up forward.
    reqs, samples, ref = {}, {}, {}
    for name, task in tasks.items():
        prep = prepare(task, "search", tok)
        reqs[name] = [[(r.context, r.continuation) for r in u.requests] for u in prep.units[:LIMIT]]
        res = evaluate(model, tok, [task], split="search", limit=LIMIT, threads=THREADS[0], log_samples=True)[name]
        samples[name], ref[name] = res.samples, res
        assert len(res.samples) == sum(map(len, reqs[name]))

    ratios, fitness = [], []
    for threads in THREADS:
        torch.set_num_threads(threads)
        for name, task in tasks.items():
            items = len(reqs[name])
            flat = [p for unit in reqs[name] for p in unit]
            tokens = sum(len(c) + len(k) for c, k in flat)
            instances = [Instance(request_type="loglikelihood", doc={}, arguments=(s["context"], s["continuation"]),
                                  idx=i) for i, s in enumerate(samples[name])]
            naive_reqs = [p for unit in reqs[name][:NAIVE_LIMIT] for p in unit]
            naive_tokens = sum(len(c) + len(k) for c, k in naive_reqs)

            t0 = time.perf_counter()
            wb1 = evaluate(model, tok, [task], split="search", limit=LIMIT, threads=threads, log_samples=True)[name]
            wb_s1 = time.perf_counter() - t0
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            lm_out = lm.loglikelihood(instances, disable_tqdm=True)
            lm_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            naive_lls = naive(model, naive_reqs)
            naive_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            evaluate(model, tok, [task], split="search", limit=LIMIT, threads=threads)
            wb_s2 = time.perf_counter() - t0
            torch.set_num_threads(threads)
            wb_s = (wb_s1 + wb_s2) / 2

            wb_lls = [s["loglikelihood"] for s in wb1.samples]
            lm_lls = [float(ll) for ll, _ in lm_out]
            max_diff = max(abs(a - b) for a, b in zip(wb_lls, lm_lls))
            naive_diff = max(abs(a - b) for a, b in zip(wb_lls[:len(naive_lls)], naive_lls))
            acc_wb, acc_lm = wb1.metrics["acc"], lm_eval_acc(wb1.samples, lm_lls)
            common = dict(task=name, threads=threads)
            emit(**common, tool="workbench", items=items, requests=len(flat), tokens=tokens, seconds=round(wb_s, 3),
                 items_per_s=rate(items, wb_s), tokens_per_s=rate(tokens, wb_s), acc=acc_wb,
                 runs_seconds=[round(wb_s1, 3), round(wb_s2, 3)])
            emit(**common, tool="lm-eval", items=items, requests=len(flat), tokens=tokens, seconds=round(lm_s, 3),
                 items_per_s=rate(items, lm_s), tokens_per_s=rate(tokens, lm_s), acc=acc_lm)
            n_naive = min(NAIVE_LIMIT, items)
            emit(**common, tool="naive", items=n_naive, requests=len(naive_reqs), tokens=naive_tokens,
                 seconds=round(naive_s, 3), items_per_s=rate(n_naive, naive_s),
                 tokens_per_s=rate(naive_tokens, naive_s))
            line = dict(**common, speedup_vs_lm_eval=round(lm_s / wb_s, 2),
                        speedup_vs_naive=round((naive_s / n_naive) / (wb_s / items), 2),
                        max_ll_diff=max_diff, max_ll_diff_vs_naive=naive_diff,
                        acc_workbench=acc_wb, acc_lm_eval=acc_lm)
            emit(**line)
            ratios.append(line)

        if threads == FITNESS_THREADS:
            # One candidate's fitness: every search split of the three skill tasks, once, with the
            # weights in bfloat16 as a search holds its resident model (spec `eval_dtype`, the
            # default); float32 for reference, not asserted.
            for weights, m in (("bfloat16", model_bf16), ("float32", model)):
                evaluate(m, tok, list(tasks.values()), split="search", threads=threads, limit=2)   # warm-up
                t0 = time.perf_counter()
                res = evaluate(m, tok, list(tasks.values()), split="search", threads=threads)
                secs = time.perf_counter() - t0
                torch.set_num_threads(threads)
                line = dict(threads=threads, weights=weights, fitness_seconds=round(secs, 3),
                            target_seconds=FITNESS_TARGET_S, items=sum(r.items for r in res.values()),
                            scores={k: round(r.score, 4) for k, r in res.items()})
                emit(**line)
                if weights == "bfloat16":
                    fitness.append(line)
    torch.set_num_threads(old_threads)

    failures = []
    for r in ratios:
        if r["max_ll_diff"] > LL_TOL:
            failures.append(f"{r['task']} threads={r['threads']}: max_ll_diff {r['max_ll_diff']:.2e} > {LL_TOL}")
        if r["acc_workbench"] != r["acc_lm_eval"]:
            failures.append(f"{r['task']}: acc {r['acc_workbench']} (workbench) != {r['acc_lm_eval']} (lm-eval)")
        if r["speedup_vs_lm_eval"] < SPEEDUP_TARGET:
            failures.append(f"{r['task']} threads={r['threads']}: speedup_vs_lm_eval "
                            f"{r['speedup_vs_lm_eval']} < {SPEEDUP_TARGET}")
    for f in fitness:
        if f["fitness_seconds"] > FITNESS_TARGET_S:
            failures.append(f"fitness_seconds {f['fitness_seconds']} > {FITNESS_TARGET_S} (threads={f['threads']})")
    assert not failures, "; ".join(failures)
