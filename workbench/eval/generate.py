"""Greedy generation for exact_match: batched (left padding), cut at the first stop string."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    return set() if eos is None else set(eos if isinstance(eos, list) else [eos])


def _takes_logits_to_keep(model) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.inference_mode()
def greedy_generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop: Sequence[str] = (), batch_size: int = 16,
                    progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy continuation text of each prompt (special tokens dropped), cut at ``stop``.

    Prompts go longest first in batches of ``batch_size``, left-padded, with a KV cache; a row
    leaves its batch (and the cache) as soon as it ends (EOS, a stop string or ``max_new_tokens``),
    so the rows still generating no longer pay for the finished ones, which transformers'
    ``generate`` keeps computing until the last row ends. The tokens are those ``generate``
    picks: the same forward per step (positions from the attention mask, logits of the last
    position), argmax.
    """
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    keep_last = {"logits_to_keep": 1} if _takes_logits_to_keep(model) else {}
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]):] = torch.tensor(list(prompts[i]))
            mask[r, width - len(prompts[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **keep_last)
        cache, alive = result.past_key_values, list(range(len(idx)))   # rows of the batch still generating
        new: list[list[int]] = [[] for _ in idx]
        for step in range(max_new_tokens):
            picked = result.logits[:, -1, :].argmax(-1).tolist()
            still = []
            for pos, (row, token) in enumerate(zip(alive, picked)):
                if token in eos:
                    continue
                new[row].append(token)
                if stop and any(s in tokenizer.decode(new[row], skip_special_tokens=True) for s in stop):
                    continue
                still.append(pos)
            if not still or step == max_new_tokens - 1:
                break
            if len(still) < len(alive):
                keep = torch.tensor(still, device=device)
                cache.batch_select_indices(keep)
                mask = mask[keep]
                alive = [alive[p] for p in still]
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            step_ids = torch.tensor([[new[row][-1]] for row in alive], device=device)
            result = model(input_ids=step_ids, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                           past_key_values=cache, use_cache=True)
        for r, i in enumerate(idx):
            out[i] = cut_at_stop(tokenizer.decode(new[r], skip_special_tokens=True), stop)
        if progress is not None:
            progress(len(idx))
    return out
