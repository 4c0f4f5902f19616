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


class _StopOnStrings:
    """A transformers stopping criterion: a row is done once its new text holds a stop string."""

    def __init__(self, tokenizer, start: int, stop: Sequence[str]):
        self.tokenizer, self.start, self.stop = tokenizer, start, list(stop)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


@torch.inference_mode()
def greedy_generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop: Sequence[str] = (), batch_size: int = 16,
                    progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy continuation text of each prompt (special tokens dropped), cut at ``stop``."""
    from transformers import GenerationConfig, StoppingCriteriaList

    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        (eos[0] if isinstance(eos, list) else eos)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                           eos_token_id=eos, pad_token_id=pad)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            p = list(prompts[i])
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        crit = StoppingCriteriaList([_StopOnStrings(tokenizer, width, stop)]) if stop else None
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg,
                             stopping_criteria=crit)
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        for i, t in zip(idx, texts):
            out[i] = cut_at_stop(t, stop)
        if progress is not None:
            progress(len(idx))
    return out
