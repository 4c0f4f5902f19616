"""The zoo's small fine-tuning loop: AdamW on a chosen subset of parameters, causal-LM loss
on the answer tokens only, chat template, seeded and deterministic, resumable.

Determinism: the examples are ordered by the caller (seeded), batch ``i`` is always examples
``[i*B, (i+1)*B)``, the model has no dropout and the learning rate is a function of the step,
so a run resumed from a checkpoint repeats, step for step, the run that was interrupted.

A checkpoint (``torch.save``, loadable with ``weights_only=True``) holds the trained tensors,
the optimizer state, the step, the loss curve and the elapsed time; it is written atomically
every ``checkpoint_every`` steps, its tensors on the CPU whatever device trains (so a run resumes
on another device).

Training runs where the model is (move it to a CUDA device first to train there), in float32.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from workbench.atomic import atomic_file
from workbench.devices import to_cpu
from workbench.faults import fault_point
from workbench.models.anatomy import body_and_head, cache_kwarg
from workbench.models.checkpoint import layer_index, load_training_state


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    lr: float = 2e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1          # the learning rate decays linearly to lr * min_lr_ratio
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    seed: int = 0
    # Trained parameters: names containing one of these substrings; of the decoder layers' ones,
    # only those in layers [layers[0], layers[1]) (all layers when None). Embeddings, norms and
    # the head stay frozen unless named here.
    trainable: tuple[str, ...] = ("self_attn.", "mlp.")
    layers: tuple[int, int] | None = None
    checkpoint_every: int = 25
    chat_template: bool = True

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    seconds: float
    trainable: list[str]
    trainable_params: int
    resumed_from: int | None = None
    step_seconds: list[float] = field(default_factory=list)


def trainable_names(model: torch.nn.Module, cfg: TrainConfig) -> list[str]:
    names = []
    for name, _ in model.named_parameters():
        if not any(s in name for s in cfg.trainable):
            continue
        idx = layer_index(name)
        if cfg.layers is not None and idx is not None and not cfg.layers[0] <= idx < cfg.layers[1]:
            continue
        names.append(name)
    return names


def chat_prefix_ids(tok, user: str, chat_template: bool = True) -> list[int]:
    """The prompt as one user turn of the chat template (plain tokens without a template)."""
    if chat_template and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=True,
                                      add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tok(user, add_special_tokens=False)["input_ids"]


def encode_example(tok, prompt: str, answer: str, chat_template: bool = True) -> tuple[list[int], list[int]]:
    """(context ids, target ids): the chat-formatted prompt, then the answer and end-of-turn."""
    ctx = chat_prefix_ids(tok, prompt, chat_template)
    target = tok(answer, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        target = target + [tok.eos_token_id]
    return ctx, target


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then linear decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    frac = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (1.0 - (1.0 - cfg.min_lr_ratio) * frac)


def common_prefix_length(ids: torch.Tensor, limit: int) -> int:
    """Length of the prefix shared by every row of ``ids``, at most ``limit``."""
    same = (ids[:, :limit] == ids[:1, :limit]).all(dim=0)
    return int(same.long().cumprod(0).sum())


def shared_prefix_forward(body, ids: torch.Tensor, mask: torch.Tensor, min_context: int) -> torch.Tensor:
    """Last hidden states of a right-padded batch whose rows share a prefix (the chat template's
    system turn): the prefix runs once and its key/value cache is repeated over the batch.

    The hidden states of the prefix positions are not returned (rows of zeros stand in for
    them): callers read only positions at or after ``min_context - 1``. Gradients flow through
    the shared prefix exactly as through a full forward.
    """
    from transformers import DynamicCache

    p = common_prefix_length(ids, max(min_context - 1, 0))
    if p < 8 or ids.shape[0] == 1:
        return body(input_ids=ids, attention_mask=mask).last_hidden_state
    cache = DynamicCache()
    kw = cache_kwarg(body)
    body(input_ids=ids[:1, :p], attention_mask=mask[:1, :p], use_cache=True, **{kw: cache})
    cache.batch_repeat_interleave(ids.shape[0])
    rest = body(input_ids=ids[:, p:], attention_mask=mask, use_cache=True, **{kw: cache}).last_hidden_state
    return torch.cat([rest.new_zeros(ids.shape[0], p, rest.shape[-1]), rest], dim=1)


def batch_loss(model, batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy over the target tokens of a batch; the head runs only on them."""
    body, head = body_and_head(model)
    device = next(model.parameters()).device
    width = max(len(c) + len(t) for c, t in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    rows, pos, targets = [], [], []
    for i, (c, t) in enumerate(batch):
        full = c + t
        ids[i, : len(full)] = torch.tensor(full)
        mask[i, : len(full)] = 1
        for j, tid in enumerate(t):
            rows.append(i)
            pos.append(len(c) + j - 1)
            targets.append(tid)
    hidden = shared_prefix_forward(body, ids.to(device), mask.to(device), min(len(c) for c, _ in batch))
    logits = head(hidden[torch.tensor(rows, device=device), torch.tensor(pos, device=device)])
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets, device=device))


def _config_key(cfg: TrainConfig, n_examples: int, extra: dict | None) -> str:
    return json.dumps({"config": cfg.to_json(), "examples": n_examples, "extra": extra or {}}, sort_keys=True)


def train(model, tok, examples: Sequence[tuple[str, str]], cfg: TrainConfig, checkpoint: Path | None = None,
          on_step: Callable[[int, int, float], None] | None = None, fingerprint: dict | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Fine-tune ``model`` in place on ``(prompt, answer)`` pairs, ``cfg.batch_size`` per step.

    With ``checkpoint``, the run resumes from it when it exists and matches this run (same
    config, example count and ``fingerprint``), and saves to it every ``cfg.checkpoint_every``
    steps. ``stop_after`` ends the run after that many steps in total (for tests of resuming).
    ``on_step(step, steps, loss)`` reports progress.
    """
    need = cfg.steps * cfg.batch_size
    if len(examples) < need:
        raise ValueError(f"{cfg.steps} steps of {cfg.batch_size} need {need} examples, got {len(examples)}")
    torch.manual_seed(cfg.seed)
    names = trainable_names(model, cfg)
    if not names:
        raise ValueError(f"no parameter matches trainable={cfg.trainable} layers={cfg.layers}")
    wanted = set(names)
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in wanted)
    train_params = [params[n] for n in names]
    opt = torch.optim.AdamW(train_params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    key = _config_key(cfg, len(examples), fingerprint)

    start, losses, step_seconds, elapsed, resumed = 0, [], [], 0.0, None
    if checkpoint is not None and Path(checkpoint).is_file():
        state = load_training_state(checkpoint)
        if state.get("key") == key:
            with torch.no_grad():
                for n in names:
                    params[n].copy_(state["trainable"][n])
            opt.load_state_dict(state["optimizer"])
            start, losses = int(state["step"]), list(state["losses"])
            step_seconds, elapsed, resumed = list(state["step_seconds"]), float(state["elapsed"]), start

    def save(step: int) -> None:
        state = {"key": key, "step": step, "losses": losses, "step_seconds": step_seconds, "elapsed": elapsed,
                 "trainable": {n: params[n].detach().cpu().clone() for n in names},
                 "optimizer": to_cpu(opt.state_dict())}
        with atomic_file(checkpoint, "wb") as f:
            torch.save(state, f)
        fault_point("train:checkpoint")

    was_training = model.training
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            chunk = examples[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            batch = [encode_example(tok, p, a, cfg.chat_template) for p, a in chunk]
            loss = batch_loss(model, batch, pad_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(train_params, cfg.max_grad_norm)
            opt.step()
            dt = time.perf_counter() - t0
            losses.append(float(loss.detach()))
            step_seconds.append(dt)
            elapsed += dt
            if checkpoint is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == end):
                save(step + 1)
            if on_step:
                on_step(step + 1, cfg.steps, losses[-1])
    finally:
        model.train(was_training)
        for p in params.values():
            p.requires_grad_(False)
    return TrainResult(steps=end, losses=losses, seconds=elapsed, trainable=names,
                       trainable_params=sum(params[n].numel() for n in names), resumed_from=resumed,
                       step_seconds=step_seconds)


def smoothed(losses: list[float], window: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(losses):
        acc += x
        if i >= window:
            acc -= losses[i - window]
        out.append(acc / min(i + 1, window))
    return out


def mean_loss(losses: list[float], first: int | None = None, last: int | None = None) -> float:
    xs = losses[:first] if first else losses[-last:] if last else losses
    return sum(xs) / max(len(xs), 1) if xs else math.nan
