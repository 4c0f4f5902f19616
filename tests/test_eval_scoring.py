"""Log-likelihoods, metrics, exact match, perplexity and KL against plain transformers computations."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import VOCAB, save_tiny_model, tiny_tokenizer

from workbench.errors import WorkbenchError
from workbench.eval import evaluate, load_task, scoring
from workbench.eval import kl as kl_mod
from workbench.eval import generate as generate_mod
from workbench.eval.generate import cut_at_stop, generate_and_score, greedy_generate
from workbench.eval.metrics import mean_stderr, multiple_choice_unit, token_mean_metrics
from workbench.eval.requests import encode_pairs, prepare

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and a busy machine makes them much slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-models")
    dirs = {a: save_tiny_model(root / a, a, seed=0) for a in ARCHS}
    dirs["llama-b"] = save_tiny_model(root / "llama-b", "llama", seed=5, base=dirs["llama"], delta_scale=0.05)
    return dirs


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def ref_logprobs(model, ctx: list[int], cont: list[int]) -> np.ndarray:
    """The plain reference: full forward of ctx+cont, log_softmax, gather the continuation's tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return np.array([logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)])


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(n))


def write_task(d: Path, header: dict, items: list, name: str = "t") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.yml").write_text(yaml.safe_dump({"name": name, "items": f"{name}.jsonl", **header}))
    (d / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    return d / f"{name}.yml"


def mc_items(seed: int, n: int, split: str = "search", single: bool = False) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.choice([2, 3, 4])
        choices = [words(rng, 1 if single or (i % 3 == 0) else rng.randint(1, 4)) for _ in range(k)]
        out.append({"split": split, "context": f"w{3 + i % 90} " + words(rng, rng.randint(0, 12)),
                    "choices": choices, "gold": rng.randrange(k)})
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_loglikelihoods_match_plain_forward(model_dirs, arch, monkeypatch):
    if arch == "llama":   # also apply the output projection in small slices of positions
        monkeypatch.setattr(scoring, "HEAD_SLICE", 3)
    model = load(model_dirs[arch])
    assert scoring.fast_path_ok(model)
    g = torch.Generator().manual_seed(1)
    reqs = []
    for i in range(7):   # shared contexts with multi-token, single-token and mixed continuations
        ctx = torch.randint(3, VOCAB, (int(torch.randint(1, 25, (1,), generator=g)),), generator=g).tolist()
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            n = 1 if i % 2 else int(torch.randint(1, 6, (1,), generator=g))
            reqs.append((ctx, torch.randint(3, VOCAB, (n,), generator=g).tolist()))
    ref = [ref_logprobs(model, c, k) for c, k in reqs]
    for fast in (True, False):
        for batch_size in (1, 3, 64):   # padded batches of rows of different lengths
            out = scoring.score_requests(model, reqs, batch_size=batch_size, fast=fast)
            for (c, k), o, r in zip(reqs, out, ref):
                assert o.shape == (len(k), 2)
                np.testing.assert_allclose(o[:, 0].numpy(), r, atol=1e-4)
    lls = scoring.loglikelihoods(model, reqs)
    assert [ll for ll, _ in lls] == pytest.approx([r.sum() for r in ref], abs=1e-4)
    greedy = [all(ref_argmax == t for ref_argmax, t in zip(
        model(torch.tensor([c + k])).logits[0, len(c) - 1:len(c) - 1 + len(k)].argmax(-1).tolist(), k))
        for c, k in reqs]
    assert [g for _, g in lls] == greedy


def test_single_token_choices_cost_one_forward_per_context(model_dirs):
    rows = scoring.build_rows([([5, 6, 7], [8]), ([5, 6, 7], [9]), ([5, 6, 7], [10]), ([4], [8, 9])],
                              packed=True, max_length=None)
    assert sorted(len(r.tokens) for r in rows) == [2, 3]       # the context once; [4, 8] for the other
    ctx_row = next(r for r in rows if r.requests == 3)
    assert ctx_row.tokens == [5, 6, 7] and {p for p, *_ in ctx_row.scored} == {2}
    plain = scoring.build_rows([([5, 6, 7], [8]), ([5, 6, 7], [9])], packed=False, max_length=None)
    assert len(plain) == 2


def test_continuations_that_start_alike_share_tree_nodes():
    rows = scoring.build_rows([([1, 2, 3], [4, 5, 6]), ([1, 2, 3], [4, 5, 7]), ([1, 2, 3], [4, 9, 6]),
                               ([1, 2, 3], [8])], packed=True, max_length=None)
    (row,) = rows
    assert row.tokens == [1, 2, 3, 4, 5, 9]                # "4" once, then its two children
    assert row.parents == [-1, 0, 1, 2, 3, 3] and row.positions == [0, 1, 2, 3, 4, 4]
    by_request = {}
    for pos, target, req, j in row.scored:
        by_request.setdefault(req, []).append((pos, target))
    assert by_request[0] == [(2, 4), (3, 5), (4, 6)] and by_request[1] == [(2, 4), (3, 5), (4, 7)]
    assert by_request[2] == [(2, 4), (3, 9), (5, 6)] and by_request[3] == [(2, 8)]


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_cache_matches_plain_forward(model_dirs, arch, monkeypatch):
    """Contexts that all start with the same tokens (a chat template's system prompt): the prefix
    runs once through a cache, and every log-prob still equals the plain forward's."""
    model = load(model_dirs[arch])
    assert scoring.fast_mode(model) is True   # checked (and cached) before the spy below
    calls = []
    real = scoring._run_prefix
    monkeypatch.setattr(scoring, "_run_prefix", lambda *a: calls.append(len(a[1])) or real(*a))
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(3, VOCAB, (12,), generator=g).tolist()
    reqs = []
    for i in range(6):
        ctx = prefix + torch.randint(3, VOCAB, (i % 4 + 1,), generator=g).tolist()
        for n in (1, 3, 3):
            reqs.append((ctx, torch.randint(3, VOCAB, (n,), generator=g).tolist()))
    reqs.append((prefix[:10] + [7], [8, 9]))   # shares only 10 tokens: the prefix shrinks to 10
    out = scoring.score_requests(model, reqs, batch_size=4)
    assert calls == [10]
    for (c, k), o in zip(reqs, out):
        np.testing.assert_allclose(o[:, 0].numpy(), ref_logprobs(model, c, k), atol=1e-4)


def test_broken_fast_path_falls_back_to_plain(model_dirs):
    model = load(model_dirs["llama"])
    head = model.get_output_embeddings()

    class Scaled(torch.nn.Module):   # what a model with logit scaling outside lm_head looks like to us
        def forward(self, h):
            return head(h) * 0.5

    scaled = Scaled()
    model.get_output_embeddings = lambda: scaled
    assert not scoring.fast_path_ok(model)
    reqs = [([5, 6, 7], [8, 9]), ([5, 6, 7], [10])]
    out = scoring.score_requests(model, reqs)
    for (c, k), o in zip(reqs, out):
        np.testing.assert_allclose(o[:, 0].numpy(), ref_logprobs(model, c, k), atol=1e-4)


def test_boundary_merge_uses_the_whole_texts_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "a": 1, "b": 2, "ab": 3, "c": 4}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
    pairs, merges = encode_pairs(t, [("c a", "b"), ("c a", " b"), ("", "ab"), ("c  ", "a")])
    assert merges == 1
    assert pairs[0] == ([4], [3])          # "c a"+"b" = [c, ab]: context is the common prefix [c]
    assert pairs[1] == ([4, 1], [2])       # no merge across a space
    assert pairs[2] == ([0], [3])          # empty context: the prefix token
    assert pairs[3] == ([4], [1])          # trailing spaces move into the continuation


def test_multiple_choice_metrics_from_reference_lls(model_dirs, tmp_path):
    model, tok = load(model_dirs["qwen2"]), tiny_tokenizer()
    items = mc_items(0, 25)
    task = load_task(write_task(tmp_path, {"type": "multiple_choice"}, items))
    res = evaluate(model, tok, task, log_samples=True, batch_size=4)["t"]
    acc, acc_norm, score = [], [], []
    by_item = {}
    for s in res.samples:
        by_item.setdefault(s["item"], []).append(s)
    assert len(by_item) == 25 and res.items == 25 and not res.stopped_early
    assert any(it["context"].endswith(" ") for it in items)
    for i, it in enumerate(items):
        ss = by_item[i]
        lls = []
        for j, (s, choice) in enumerate(zip(ss, it["choices"])):
            ctx = it["context"].rstrip()   # trailing whitespace moves into the continuation (lm-eval)
            cont = it["context"][len(ctx):] + " " + choice
            assert s["choice"] == j and s["continuation"] == cont and s["context"] == ctx
            c = tok(ctx, add_special_tokens=False).input_ids
            whole = tok(ctx + cont, add_special_tokens=False).input_ids
            ll = ref_logprobs(model, c, whole[len(c):]).sum()
            assert s["loglikelihood"] == pytest.approx(ll, abs=1e-4)
            lls.append(ll)
        acc.append(float(np.argmax(lls) == it["gold"]))
        acc_norm.append(float(np.argmax(np.array(lls) / [len(c) for c in it["choices"]]) == it["gold"]))
        p = np.exp(np.array(lls) - max(lls))
        score.append(p[it["gold"]] / p.sum())
    assert res.metrics["acc"] == pytest.approx(np.mean(acc))
    assert res.metrics["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert res.metrics["score"] == pytest.approx(np.mean(score), abs=1e-6)
    assert res.stderr["acc"] == pytest.approx(np.std(acc, ddof=1) / 5)
    assert res.stderr["score"] == pytest.approx(np.std(score, ddof=1) / 5, abs=1e-6)
    d = res.to_dict()
    assert {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "score", "score_stderr", "items", "seconds"} <= set(d)
    # limit takes the first N items in file order
    assert evaluate(model, tok, task, limit=5)["t"].items == 5


def test_metrics_by_hand():
    u = multiple_choice_unit([-1.0, -2.0, -3.0], ["a", "bb", "c"], 0)
    assert u["acc"] == 1.0
    assert u["score"] == pytest.approx(math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3)))
    u = multiple_choice_unit([-4.0, -5.0], ["a", "bbbbbbbb"], 0)   # -4/1 < -5/8: acc_norm picks choice 1
    assert (u["acc"], u["acc_norm"]) == (1.0, 0.0)
    assert mean_stderr([1, 0, 1, 1]) == (0.75, 0.25)
    m, se = mean_stderr([3.0])
    assert m == 3.0 and math.isnan(se)
    metrics, stderr = token_mean_metrics(np.array([1.0, 2.0, 3.0]), "nll")
    assert metrics["ppl"] == pytest.approx(math.exp(2.0)) and metrics["score"] == pytest.approx(math.exp(-2.0))
    assert stderr["nll"] == pytest.approx(1 / math.sqrt(3))
    assert stderr["ppl"] == pytest.approx(math.exp(2.0) / math.sqrt(3))


def test_weights_changed_in_place_change_the_score(model_dirs, tmp_path):
    model, tok = load(model_dirs["llama"]), tiny_tokenizer()
    task = load_task(write_task(tmp_path, {"type": "multiple_choice"}, mc_items(1, 8)))
    before = evaluate(model, tok, task, log_samples=True)["t"]
    with torch.no_grad():
        model.get_output_embeddings().weight[7].add_(3.0)    # one row of one tensor, in place
    after = evaluate(model, tok, task, log_samples=True)["t"]
    assert after.metrics["score"] != before.metrics["score"]
    s = after.samples[0]
    c = tok(s["context"], add_special_tokens=False).input_ids
    whole = tok(s["context"] + s["continuation"], add_special_tokens=False).input_ids
    assert s["loglikelihood"] == pytest.approx(ref_logprobs(model, c, whole[len(c):]).sum(), abs=1e-4)


def test_tokenization_is_cached_per_tokenizer(model_dirs, tmp_path):
    tok = tiny_tokenizer()
    task = load_task(write_task(tmp_path, {"type": "multiple_choice"}, mc_items(2, 4)))
    assert prepare(task, "search", tok) is prepare(task, "search", tok)
    assert prepare(task, "search", tiny_tokenizer()) is not prepare(task, "search", tok)


def test_fewshot_from_its_own_split_and_chat_template(model_dirs, tmp_path):
    model, tok = load(model_dirs["mistral"]), tiny_tokenizer()
    items = mc_items(3, 6) + mc_items(4, 5, split="fewshot")
    header = {"type": "multiple_choice", "num_fewshot": 2, "fewshot_split": "fewshot"}
    task = load_task(write_task(tmp_path, header, items))
    res = evaluate(model, tok, task, log_samples=True)["t"]
    shots = [f"{it['context']} {it['choices'][it['gold']]}" for it in items[6:]]
    for s in res.samples:
        parts = s["context"].split("\n\n")
        assert len(parts) == 3 and all(p in shots for p in parts[:2])
        assert parts[2] == items[s["item"]]["context"].rstrip()
    with pytest.raises(WorkbenchError, match="holds the few-shot examples"):
        evaluate(model, tok, task, split="fewshot")

    chat = load_task(write_task(tmp_path, {**header, "chat_template": True}, items, name="c"))
    with pytest.raises(WorkbenchError, match="chat_template: the tokenizer has no chat template"):
        evaluate(model, tok, chat)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}assistant{% endif %}")
    res = evaluate(model, tok, chat, log_samples=True)["c"]
    s = res.samples[0]
    assert s["context"].startswith("user ") and s["context"].endswith("assistant")
    assert s["context"].count("assistant ") == 2 and s["continuation"] == items[0]["choices"][0]


def naive_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == 2:
                break
    return ids[len(prompt):]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_greedy_generation_matches_a_naive_loop(model_dirs, arch):
    model, tok = load(model_dirs[arch]), tiny_tokenizer()
    prompts = [[5, 9, 11], [7], [20, 21, 22, 23, 24, 25], [30, 31]]
    got = greedy_generate(model, tok, prompts, max_new_tokens=5, batch_size=3)
    assert got == [tok.decode(naive_greedy(model, p, 5), skip_special_tokens=True) for p in prompts]
    assert cut_at_stop("w5 w6. w7\nw8", ["\n", "."]) == "w5 w6"


def hf_greedy(model, tok, prompts, n: int, stop, batch_size: int) -> list[str]:
    """transformers' own batched generate (left padding, every row computed until the batch ends)."""
    from transformers import GenerationConfig

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=2, pad_token_id=2)
    out = [""] * len(prompts)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), 2)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        for i, t in zip(idx, tok.batch_decode(gen[:, width:], skip_special_tokens=True)):
            out[i] = cut_at_stop(t, stop)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_greedy_generation_with_rows_leaving_equals_transformers_generate(model_dirs, arch):
    """Rows leave the batch when they end; the texts are transformers' generate's (stop strings cut)."""
    model, tok = load(model_dirs[arch]), tiny_tokenizer()
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 96) for _ in range(rng.randint(1, 12))] for _ in range(23)]
    ref = hf_greedy(model, tok, prompts, 9, [], batch_size=8)
    stops = sorted({t.split()[1] for t in ref if len(t.split()) > 2})[:3]   # words some rows reach early
    assert stops, "no row long enough to stop early"
    for stop in ([], stops):
        got = greedy_generate(model, tok, prompts, max_new_tokens=9, stop=stop, batch_size=8)
        assert got == hf_greedy(model, tok, prompts, 9, stop, batch_size=8)
    assert any(t != cut_at_stop(t, stops) for t in ref)   # some rows did stop early


def _count_steps(model) -> list[int]:
    """Record the rows of every one-token (decode) forward of ``model``."""
    steps, forward = [], model.forward

    def counting(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if kwargs.get("past_key_values") is not None and ids.shape[1] == 1:
            steps.append(ids.shape[0])
        return forward(*args, **kwargs)

    model.forward = counting
    return steps


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_refills_free_rows_and_scores_continuations_in_the_prefill(model_dirs, arch, monkeypatch):
    """Queued prompts take the slots of rows that ended, so a few long rows no longer hold a batch
    each (fewer decode steps than batch after batch, same texts), and a continuation riding in a
    prompt's prefill scores as a plain full forward of prompt + continuation."""
    model, tok = load(model_dirs[arch]), tiny_tokenizer()
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 96) for _ in range(rng.randint(1, 12))] for _ in range(24)]
    conts = [[rng.randrange(3, 96) for _ in range(rng.randint(1, 4))] if i % 3 else None for i in range(24)]
    want = [tok.decode(naive_greedy(model, p, 10), skip_special_tokens=True) for p in prompts]
    long_rows = [t for i, t in enumerate(want) if i % 6 == 0]   # one row in six runs all 10 tokens
    stops = sorted({t.split()[0] for i, t in enumerate(want) if i % 6 and t.split()}
                   - {w for w in {t.split()[0] for t in want if t.split()} if any(w in t for t in long_rows)})
    assert len(stops) >= 6
    steps = _count_steps(model)
    texts, scores = generate_and_score(model, tok, prompts, 10, stops, batch_size=6, continuations=conts)
    assert texts == [cut_at_stop(t, stops) for t in want]
    for p, c, v in zip(prompts, conts, scores):
        if c is None:
            assert v is None
            continue
        ref = ref_logprobs(model, p, c)
        assert v.dtype == torch.float64 and v.shape == (len(c), 2)
        np.testing.assert_allclose(v[:, 0].numpy(), ref, atol=1e-5)
        with torch.no_grad():
            argmax = model(torch.tensor([p + c])).logits[0, len(p) - 1:-1].argmax(-1)
        assert v[:, 1].tolist() == (argmax == torch.tensor(c)).double().tolist()
    refilled = len(steps)
    # a cache that cannot be joined: batch after batch, the same texts and scores
    monkeypatch.setattr(generate_mod, "_plain_layers", lambda cache: None)
    steps.clear()
    texts2, scores2 = generate_and_score(model, tok, prompts, 10, stops, batch_size=6, continuations=conts)
    assert texts2 == texts
    assert all((a is None and b is None) or torch.allclose(a, b, atol=1e-5) for a, b in zip(scores, scores2))
    assert refilled < len(steps), (refilled, len(steps))


def test_exact_match_task(model_dirs, tmp_path):
    model, tok = load(model_dirs["llama"]), tiny_tokenizer()
    rng = random.Random(5)
    items = []
    while len(items) < 6:
        p = words(rng, rng.randint(1, 6))
        gen = tok.decode(naive_greedy(model, tok(p, add_special_tokens=False).input_ids, 3), skip_special_tokens=True)
        if gen.strip():   # answers "W5 w6  " for the even items match after strip + lower
            answers = ["w3 w3 w3 w3", gen.upper() + "  "] if len(items) % 2 == 0 else ["w3 w3 w3 w3"]
            items.append({"split": "search", "prompt": p, "answers": answers})
    header = {"type": "exact_match", "max_new_tokens": 3, "normalize": ["strip", "lower"]}
    res = evaluate(model, tok, load_task(write_task(tmp_path, header, items)), log_samples=True)["t"]
    assert res.metrics["exact_match"] == 0.5
    assert [s["exact_match"] for s in res.samples] == [1.0, 0.0] * 3
    for s, it in zip(res.samples, items):
        c = tok(it["prompt"], add_special_tokens=False).input_ids
        whole = tok(it["prompt"] + " " + it["answers"][0], add_special_tokens=False).input_ids
        ref = ref_logprobs(model, c, whole[len(c):])
        assert s["loglikelihood"] == pytest.approx(ref.sum(), abs=1e-4)
        assert "generation" in s
    ref_scores = [math.exp(s["loglikelihood"] / s["tokens"]) for s in res.samples]
    assert res.metrics["score"] == pytest.approx(np.mean(ref_scores))
    assert 0 < res.metrics["score"] < 1


def test_perplexity_matches_direct_windows(model_dirs, tmp_path):
    model, tok = load(model_dirs["gpt2"]), tiny_tokenizer()
    rng = random.Random(7)
    docs = [words(rng, 23), words(rng, 5), words(rng, 40)]
    items = [{"split": "search", "text": d} for d in docs]
    header = {"type": "perplexity", "max_length": 8, "stride": 3, "max_tokens": 50}
    res = evaluate(model, tok, load_task(write_task(tmp_path, header, items)))["t"]
    nll, budget = [], 50
    for d in docs:   # BOS + tokens; each target sees up to max_length previous tokens, windows of stride 3
        ids = tok(d, add_special_tokens=False).input_ids[:budget]
        budget -= len(ids)
        seq = [1] + ids
        t = 1
        while t < len(seq):
            end = min(t + (3 if t > 1 else 8), len(seq))
            begin = max(0, end - 1 - 8)
            nll += list(-ref_logprobs(model, seq[begin:t], seq[t:end]))
            t = end
    assert res.tokens == 50 == len(nll) and res.to_dict()["tokens"] == 50
    assert res.metrics["nll"] == pytest.approx(np.mean(nll), abs=1e-5)
    assert res.metrics["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)
    assert res.metrics["score"] == pytest.approx(math.exp(-np.mean(nll)), rel=1e-5)
    assert res.stderr["nll"] == pytest.approx(np.std(nll, ddof=1) / math.sqrt(50), rel=1e-4)


def direct_kl(teacher, student, ctx: list[int], cont: list[int], k: int) -> np.ndarray:
    """The top-k + tail KL computed straight from both models' full softmaxes."""
    with torch.no_grad():
        seq = torch.tensor([ctx + cont[:-1]])
        p = torch.softmax(teacher(seq).logits[0].double(), -1)[len(ctx) - 1:]
        q = torch.softmax(student(seq).logits[0].double(), -1)[len(ctx) - 1:]
    out = []
    for pi, qi in zip(p, q):
        top = pi.topk(k).indices
        rest = torch.ones_like(pi, dtype=torch.bool)
        rest[top] = False
        val = float((pi[top] * (pi[top].log() - qi[top].log())).sum())
        if rest.any():
            val += float(pi[rest].sum() * (pi[rest].sum().log() - qi[rest].sum().log()))
        out.append(val)
    return np.array(out)


def test_kl_equals_direct_computation_and_caches_teacher(model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    teacher, student, tok = load(model_dirs["llama"]), load(model_dirs["llama-b"]), tiny_tokenizer()
    rng = random.Random(11)
    items = [{"split": "search", "text": words(rng, 30)}, {"split": "search", "text": words(rng, 12)}]
    results = {}
    for k in (4, VOCAB):
        header = {"type": "kl", "reference": str(model_dirs["llama"]), "top_k": k, "max_length": 16, "stride": 8}
        task = load_task(write_task(tmp_path, header, items, name=f"kl{k}"))
        res = evaluate(student, tok, task)[f"kl{k}"]
        direct = np.concatenate([direct_kl(teacher, student, u.requests[0].context, u.requests[0].continuation, k)
                                 for u in prepare(task, "search", tok).units])
        assert res.tokens == direct.size == 42
        assert res.metrics["kl"] == pytest.approx(direct.mean(), rel=1e-4, abs=1e-7)
        assert res.metrics["score"] == pytest.approx(math.exp(-direct.mean()), rel=1e-4)
        results[k] = res.metrics["kl"]
        assert evaluate(teacher, tok, task)[f"kl{k}"].metrics["kl"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < results[4] < results[VOCAB]   # coarse-graining lower-bounds the full KL
    cached = list((tmp_path / "home" / "eval-cache" / "kl").glob("*.safetensors"))
    assert len(cached) == 2
    # a fresh process (empty memory cache) reads the file instead of loading the teacher
    kl_mod._MEMORY.clear()
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("teacher reloaded")))
    assert evaluate(student, tok, task)[f"kl{VOCAB}"].metrics["kl"] == pytest.approx(results[VOCAB])


def test_kl_cache_key_follows_the_reference_weights(model_dirs, tmp_path):
    tok = tiny_tokenizer()
    ref = save_tiny_model(tmp_path / "ref", "llama", seed=0)
    header = {"type": "kl", "reference": str(ref), "max_length": 16}
    task = load_task(write_task(tmp_path, header, [{"split": "search", "text": "w5 w6 w7 w8"}]))
    prep = prepare(task, "search", tok)
    key1 = kl_mod.cache_key(kl_mod.model_files_hash(ref), prep, 32)
    save_tiny_model(tmp_path / "ref", "llama", seed=1)   # new weights, same path
    key2 = kl_mod.cache_key(kl_mod.model_files_hash(ref), prep, 32)
    assert key1 != key2
    assert kl_mod.cache_key(kl_mod.model_files_hash(ref), prep, 16) != key2


def test_bfloat16_autocast_is_close(model_dirs, tmp_path):
    model, tok = load(model_dirs["llama"]), tiny_tokenizer()
    task = load_task(write_task(tmp_path, {"type": "multiple_choice"}, mc_items(6, 10)))
    f32 = evaluate(model, tok, task, log_samples=True)["t"]
    bf16 = evaluate(model, tok, task, log_samples=True, dtype="bfloat16", threads=1)["t"]
    diffs = [abs(a["loglikelihood"] - b["loglikelihood"]) for a, b in zip(f32.samples, bf16.samples)]
    assert 0 < max(diffs) < 0.5
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    with pytest.raises(WorkbenchError, match="dtype: 'int8' is not one of"):
        evaluate(model, tok, task, dtype="int8")
