"""Speed of the evaluator against plain loops, on a 4-choice task built from OS-shipped text.

    python -m workbench.eval.bench [MODEL_DIR] [--items 100] [--threads 2] [--modes naive,batched,ours,...]

Each item's context is a sentence run of a license text in /usr/share/common-licenses; the gold
choice is the text that follows, the three others are continuations taken from elsewhere in the
same text. Modes: ``naive`` (one full forward per request, batch 1), ``batched`` (lm-eval's HF
loop: one row per request, sorted longest first, batches of 32, full logits), ``ours`` (float32),
``ours-bf16`` (bfloat16 autocast), ``ours-bf16-cast`` (weights cast to bfloat16). Prints one
JSON line per mode with items/s and request tokens/s (context + continuation tokens per request,
what the plain loops process), the largest log-likelihood difference from ``naive`` (when it ran
first) and, for the evaluator's modes, acc / acc_norm / score.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import tempfile
import time
from pathlib import Path

import torch

LICENSE = Path("/usr/share/common-licenses/GPL-3")


def license_mc_items(n_items: int, rng: random.Random) -> list[dict]:
    """``n_items`` 4-choice items ``{context, choices, gold}`` from a license text: the gold choice is
    the text that follows the context, the others continuations from elsewhere in it."""
    words = re.sub(r"\s+", " ", LICENSE.read_text()).split(" ")
    items, used = [], set()
    while len(items) < n_items:
        start = rng.randrange(0, len(words) - 120)
        if start in used:
            continue
        used.add(start)
        n_ctx, n_ch = rng.randint(25, 50), rng.randint(3, 8)
        ctx = " ".join(words[start:start + n_ctx])
        gold = " ".join(words[start + n_ctx:start + n_ctx + n_ch])
        others = []
        for _ in range(3):
            o = rng.randrange(0, len(words) - 10)
            others.append(" ".join(words[o:o + rng.randint(3, 8)]))
        choices = others[:]
        g = rng.randrange(4)
        choices.insert(g, gold)
        items.append({"context": ctx, "choices": choices, "gold": g})
    return items


def build_task(out_dir: Path, n_items: int, seed: int = 0) -> Path:
    """Write a multiple_choice task of ``n_items`` 4-choice items from a license text."""
    items = [{"split": "search", **it} for it in license_mc_items(n_items, random.Random(seed))]
    (out_dir / "bench_mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (out_dir / "bench_mc.yml").write_text("name: bench_mc\ntype: multiple_choice\nitems: bench_mc.jsonl\n"
                                          "description: continuations of GPL-3 text (speed benchmark)\n")
    return out_dir / "bench_mc.yml"


@torch.inference_mode()
def naive(model, reqs) -> list[float]:
    out = []
    for ctx, cont in reqs:
        logits = model(torch.tensor([ctx + cont])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        out.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
    return out


@torch.inference_mode()
def batched(model, reqs, batch_size: int = 32) -> list[float]:
    order = sorted(range(len(reqs)), key=lambda i: -len(reqs[i][0]) - len(reqs[i][1]))
    out = [0.0] * len(reqs)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        seqs = [(reqs[i][0] + reqs[i][1])[:-1] for i in idx]
        width = max(map(len, seqs))
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for r, i in enumerate(idx):
            ctx, cont = reqs[i]
            pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
            out[i] = float(logp[r, pos, torch.tensor(cont)].sum())
    return out


def main(argv: list[str] | None = None) -> None:
    from workbench.eval import evaluate, load_task
    from workbench.eval.requests import prepare
    from workbench.home import default_model_dir
    from workbench.models.loader import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", type=Path, default=default_model_dir())
    p.add_argument("--items", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default="naive,batched,ours,ours-bf16,ours-bf16-cast")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    with tempfile.TemporaryDirectory() as d:
        task = load_task(build_task(Path(d), args.items))
    prep = prepare(task, "search", tok)
    reqs = [(r.context, r.continuation) for u in prep.units for r in u.requests]
    tokens = sum(len(c) + len(k) for c, k in reqs)
    ref = None
    for mode in args.modes.split(","):
        t0, extra = time.perf_counter(), {}
        if mode == "naive":
            lls = naive(model, reqs)
        elif mode == "batched":
            lls = batched(model, reqs)
        else:
            m = model
            kw = {"dtype": "bfloat16"} if mode == "ours-bf16" else {}
            if mode == "ours-bf16-cast":
                m = copy.deepcopy(model).to(torch.bfloat16)
                t0 = time.perf_counter()
            res = evaluate(m, tok, task, log_samples=True, **kw)["bench_mc"]
            lls = [s["loglikelihood"] for s in res.samples]
            extra = {k: round(res.metrics[k], 4) for k in ("acc", "acc_norm", "score")}
        secs = time.perf_counter() - t0
        ref = lls if mode == "naive" else ref
        diff = max(abs(a - b) for a, b in zip(lls, ref)) if ref is not None else None
        print(json.dumps({"mode": mode, "items": len(prep.units), "requests": len(reqs), "request_tokens": tokens,
                          "seconds": round(secs, 2), "items_per_s": round(len(prep.units) / secs, 2),
                          "tokens_per_s": round(tokens / secs, 1), "max_ll_diff_vs_naive": diff,
                          "threads": args.threads, **extra}), flush=True)


if __name__ == "__main__":
    main()
