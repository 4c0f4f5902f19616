"""Turn a task split into token-level requests, once per (tokenizer, task content, split).

A request is ``(context_ids, continuation_ids)``: the continuation's log-likelihood given the
context. As in lm-eval, trailing whitespace of the context moves into the continuation, the pair is
tokenized as ``context + continuation`` and the continuation tokens are those after the context's
own tokens. When the tokenizer merges across the boundary (the whole's tokens do not start with
the context's), the split point is the longest common prefix, so the scored tokens are still the
model's own tokenization of the whole text. An empty context becomes the prefix token (BOS, else
EOS), as lm-eval does.

Prepared splits are cached in memory per tokenizer object (weakly) and task fingerprint, so a
search that evaluates thousands of candidates tokenizes each task once.
"""

from __future__ import annotations

import random
import weakref
from dataclasses import dataclass, field

from workbench.eval.taskfile import Item, Task, TaskError

Ids = list[int]


@dataclass
class Request:
    """One log-likelihood request; ``item`` indexes the prepared split's units."""

    item: int
    context: Ids
    continuation: Ids
    context_text: str = ""
    continuation_text: str = ""


@dataclass
class Unit:
    """A scored unit: a multiple-choice item, an exact-match item or a perplexity/kl window."""

    index: int
    line: int
    requests: list[Request]
    gold: int = 0
    choices: list[str] = field(default_factory=list)     # multiple_choice: choice texts (no delimiter)
    prompt: Ids = field(default_factory=list)             # exact_match: prompt tokens for generation
    prompt_text: str = ""
    answers: list[str] = field(default_factory=list)
    doc: int = 0                                          # perplexity/kl: document index


@dataclass
class Prepared:
    task: Task
    split: str
    units: list[Unit]
    boundary_merges: int = 0   # pairs whose tokenization merged across the context/continuation boundary


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prefix_token_id(tokenizer) -> int:
    """The token that stands for an empty context: BOS if the tokenizer has one, else EOS."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise TaskError("the tokenizer has neither a BOS nor an EOS token to start an empty context")
    return tid


def encode_texts(tokenizer, texts: list[str]) -> list[Ids]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def move_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's split: the context's trailing whitespace starts the continuation instead."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> tuple[list[tuple[Ids, Ids]], int]:
    """Tokenize (context, continuation) pairs lm-eval's way; returns the pairs and boundary merges."""
    moved = [move_whitespace(ctx, cont) for ctx, cont in pairs]
    ctx_ids = encode_texts(tokenizer, [c for c, _ in moved])
    whole_ids = encode_texts(tokenizer, [c + k for c, k in moved])
    prefix = None
    out, merges = [], 0
    for (ctx, cont), c, w in zip(moved, ctx_ids, whole_ids):
        if not ctx:
            prefix = prefix_token_id(tokenizer) if prefix is None else prefix
            out.append(([prefix], w))
            continue
        if w[:len(c)] != c:
            merges += 1
            n = 0
            while n < min(len(c), len(w)) and c[n] == w[n]:
                n += 1
            c = w[:n]
        cont_ids = w[len(c):]
        if not cont_ids:  # the continuation vanished into the context: score it tokenized apart
            cont_ids = encode_texts(tokenizer, [cont])[0]
            c = encode_texts(tokenizer, [ctx])[0]
        if not c:
            prefix = prefix_token_id(tokenizer) if prefix is None else prefix
            c = [prefix]
        out.append((c, cont_ids))
    return out, merges


def _render(task: Task, tokenizer, shots: list[tuple[str, str]], query: str) -> str:
    """The context text: few-shot examples then the query, plain or through the chat template."""
    if task.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise TaskError(f"{task.path}: chat_template: the tokenizer has no chat template")
        msgs = []
        for q, a in shots:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": query})
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    parts = [q + task.target_delimiter + a for q, a in shots]
    return task.fewshot_delimiter.join(parts + [query])


def _shots(task: Task, item: Item, pool: list[Item]) -> list[tuple[str, str]]:
    """``num_fewshot`` examples for ``item``, drawn from the few-shot split with a per-item seed."""
    if not task.num_fewshot:
        return []
    picked = random.Random(1234 + item.line).sample(pool, task.num_fewshot)
    if task.type == "multiple_choice":
        return [(p.data["context"], p.data["choices"][p.data["gold"]]) for p in picked]
    return [(p.data["prompt"], p.data["answers"][0]) for p in picked]


def prepare(task: Task, split: str, tokenizer) -> Prepared:
    """The split's units with tokenized requests, from the cache when this tokenizer saw it before."""
    template = getattr(tokenizer, "chat_template", None) if task.chat_template else None
    key = (task.fingerprint, split, len(tokenizer), str(template))
    try:
        per_tok = _CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: no caching
        per_tok = {}
    if key not in per_tok:
        per_tok[key] = _prepare(task, split, tokenizer)
    return per_tok[key]


def _prepare(task: Task, split: str, tokenizer) -> Prepared:
    if task.type == "lm_eval":
        from workbench.eval.lm_eval_tasks import prepare_lm_eval

        return Prepared(task, split, prepare_lm_eval(task, split, tokenizer))
    items = task.split_items(split)
    if task.num_fewshot and split == task.fewshot_split:
        raise TaskError(f"{task.path}: fewshot_split: split {split!r} holds the few-shot examples and "
                        f"cannot be evaluated with num_fewshot {task.num_fewshot}")
    pool = [it for it in task.items if it.split == task.fewshot_split] if task.num_fewshot else []
    if task.type in ("perplexity", "kl"):
        return _prepare_windows(task, split, items, tokenizer)

    units: list[Unit] = []
    pairs: list[tuple[str, str]] = []
    for i, it in enumerate(items):
        d = it.data
        query = d["context"] if task.type == "multiple_choice" else d["prompt"]
        ctx = _render(task, tokenizer, _shots(task, it, pool), query)
        if task.type == "multiple_choice":
            u = Unit(i, it.line, [], gold=d["gold"], choices=list(d["choices"]), prompt_text=ctx)
            conts = [task.target_delimiter + c for c in d["choices"]]
        else:
            u = Unit(i, it.line, [], answers=list(d["answers"]), prompt_text=ctx)
            conts = [task.target_delimiter + d["answers"][0]]
        for c in conts:   # the texts as scored (the log-samples show these)
            u.requests.append(Request(i, [], [], *move_whitespace(ctx, c)))
            pairs.append((ctx, c))
        units.append(u)
    encoded, merges = encode_pairs(tokenizer, pairs)
    owned = [(unit, req) for unit in units for req in unit.requests]
    for (u, r), (c, k) in zip(owned, encoded):
        if not k:
            field_name = "choices" if task.type == "multiple_choice" else "answers"
            raise TaskError(f"{task.items_path}:{u.line}: {field_name}: {r.continuation_text!r} "
                            f"tokenizes to no tokens")
        r.context, r.continuation = c, k
    if task.type == "exact_match":
        prompts = encode_texts(tokenizer, [u.prompt_text for u in units])
        for u, p in zip(units, prompts):
            u.prompt = p or [prefix_token_id(tokenizer)]
    return Prepared(task, split, units, merges)


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over tokens ``0..n_tokens-1`` (token 0 is the prefix, never scored).

    Returns ``(begin, score_from, end)``: the window feeds tokens ``[begin, end)`` and scores
    targets ``[score_from, end)``; every target ``1..n_tokens-1`` is scored exactly once, each with
    at most ``max_length`` tokens of input. ``stride`` new targets per window (HF's recipe).
    """
    out, scored = [], 1
    while scored < n_tokens:
        end = min(scored + stride, n_tokens) if out else min(max_length + 1, n_tokens)
        begin = max(0, end - 1 - max_length)
        out.append((begin, scored, end))
        scored = end
    return out


def _prepare_windows(task: Task, split: str, items: list[Item], tokenizer) -> Prepared:
    stride = task.stride or task.max_length
    texts = [task.document_text(it) for it in items]
    budget = task.max_tokens
    units: list[Unit] = []
    prefix = prefix_token_id(tokenizer)
    for d, (it, ids) in enumerate(zip(items, encode_texts(tokenizer, texts))):
        if budget is not None:
            if budget <= 0:
                break
            ids = ids[:budget]
            budget -= len(ids)
        seq = [prefix] + ids
        for begin, start, end in windows(len(seq), task.max_length, stride):
            req = Request(len(units), seq[begin:start], seq[start:end])
            units.append(Unit(len(units), it.line, [req], doc=d))
    if not units:
        raise TaskError(f"{task.items_path}: split {split!r} of task {task.name!r} has no tokens to score")
    return Prepared(task, split, units)
