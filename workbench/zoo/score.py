"""A small log-likelihood scorer for multiple-choice items (the zoo's own check).

The project's evaluator (``workbench.eval``) is the reference for reported scores; this is
the zoo's self-contained fallback: for each item the context is rendered with the chat
template, each choice is appended (no delimiter) and the choice with the highest summed
log-probability wins. Only continuation positions go through the output projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MCResult:
    accuracy: float
    gold_prob: float  # mean normalized probability of the gold choice (a continuous score)
    n: int


def chat_prefix_ids(tok, user: str, chat_template: bool = True) -> list[int]:
    if chat_template and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=True,
                                      add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tok(user, add_special_tokens=False)["input_ids"]


def continuation_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def sequence_logprobs(model, seqs: list[tuple[list[int], list[int]]], pad_id: int = 0) -> list[float]:
    """Summed log-probability of each continuation given its context, in one padded batch."""
    lengths = [len(c) + len(x) for c, x in seqs]
    width = max(lengths)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, pos, targets, owner = [], [], [], []
    for i, (c, x) in enumerate(seqs):
        full = c + x
        ids[i, : len(full)] = torch.tensor(full)
        mask[i, : len(full)] = 1
        for j, t in enumerate(x):
            rows.append(i)
            pos.append(len(c) + j - 1)
            targets.append(t)
            owner.append(i)
    from workbench.zoo.train import _body_and_head, shared_prefix_forward

    body, head = _body_and_head(model)
    hidden = shared_prefix_forward(body, ids, mask, min(len(c) for c, _ in seqs))
    h = hidden[torch.tensor(rows), torch.tensor(pos)]
    logp = torch.log_softmax(head(h).float(), dim=-1)
    tl = logp[torch.arange(len(targets)), torch.tensor(targets)]
    out = torch.zeros(len(seqs)).index_add_(0, torch.tensor(owner), tl)
    return out.tolist()


def score_multiple_choice(model, tok, items: list[dict], chat_template: bool = True, batch_items: int = 16,
                          progress=None) -> MCResult:
    correct, probs = 0, 0.0
    for start in range(0, len(items), batch_items):
        chunk = items[start:start + batch_items]
        seqs, spans = [], []
        for it in chunk:
            ctx = chat_prefix_ids(tok, it["context"], chat_template)
            first = len(seqs)
            seqs += [(ctx, continuation_ids(tok, ch)) for ch in it["choices"]]
            spans.append((first, len(seqs)))
        lps = sequence_logprobs(model, seqs, pad_id=tok.pad_token_id or 0)
        for it, (a, b) in zip(chunk, spans):
            ll = torch.tensor(lps[a:b])
            correct += int(int(ll.argmax()) == it["gold"])
            probs += float(torch.softmax(ll, 0)[it["gold"]])
        if progress:
            progress(min(start + batch_items, len(items)), len(items))
    n = len(items)
    return MCResult(correct / max(n, 1), probs / max(n, 1), n)
