"""Batched log-likelihoods: the transformer trunk once per context, the LM head only where scored.

Requests that share a context are packed into one row: the context once, then each
continuation's tokens (all but the last) as a branch that sees the context and its own earlier
tokens, through a 4D attention mask and explicit position ids. A row costs
``len(context) + sum(len(continuation) - 1)`` tokens instead of ``n * len(context) + ...``; when
every continuation is one token, the row is just the context and all choices are read from its
last position. Rows are sorted longest first and padded on the right. The trunk's hidden states
are gathered at the scored positions only, and only there is the output projection applied.

The packed path is checked once per model class/config against a plain forward pass (full
logits, ``log_softmax``, gather); a model it does not reproduce (ALiBi, logit soft-capping, ...)
is scored the plain way instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError

Ids = Sequence[int]
# reducer(logprobs [n, V] float32, targets [n], owners [(request, token)]) -> values [n, m]
Reducer = Callable[[torch.Tensor, torch.Tensor, list[tuple[int, int]]], torch.Tensor]


def loglik_reducer(logp: torch.Tensor, targets: torch.Tensor, owners) -> torch.Tensor:
    """Per token: (log-prob of the target, 1.0 if the target is the argmax)."""
    tok = logp.gather(1, targets[:, None])[:, 0]
    greedy = (logp.argmax(1) == targets).to(logp.dtype)
    return torch.stack([tok, greedy], 1)


@dataclass
class Row:
    tokens: list[int]
    positions: list[int]
    segments: list[int]                       # 0: the shared context; b >= 1: branch b
    scored: list[tuple[int, int, int, int]]   # (row position, target, request, token index)
    requests: int                             # how many requests the row finishes


def model_max_length(model) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def build_rows(requests: Sequence[tuple[Ids, Ids]], packed: bool, max_length: int | None) -> list[Row]:
    """Group requests by context into rows (packed) or make one row per request (plain)."""
    groups: dict[tuple, list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise WorkbenchError(f"request {i} has an empty continuation")
        key = tuple(ctx) if packed else (i,)
        groups.setdefault(key, []).append(i)
    rows = []
    for idx in groups.values():
        ctx = list(requests[idx[0]][0])
        longest = max(len(requests[i][1]) for i in idx)
        if max_length is not None and len(ctx) + longest - 1 > max_length:
            keep = max_length - longest + 1
            if keep < 1:
                raise WorkbenchError(f"a continuation of {longest} tokens does not fit the model's "
                                     f"context of {max_length} tokens")
            ctx = ctx[-keep:]
        if not ctx:
            raise WorkbenchError(f"request {idx[0]} has an empty context")
        c = len(ctx)
        tokens, positions, segments = list(ctx), list(range(c)), [0] * c
        scored = []
        for b, i in enumerate(idx, 1):
            cont = list(requests[i][1])
            start = len(tokens)
            tokens += cont[:-1]
            positions += range(c, c + len(cont) - 1)
            segments += [b] * (len(cont) - 1)
            scored.append((c - 1, cont[0], i, 0))
            scored += [(start + j, cont[j + 1], i, j + 1) for j in range(len(cont) - 1)]
        rows.append(Row(tokens, positions, segments, scored, len(idx)))
    rows.sort(key=lambda r: -len(r.tokens))
    return rows


def _batches(rows: list[Row], batch_size: int, max_batch_tokens: int, max_padding: float):
    """Consecutive rows (sorted longest first) while the batch stays within the size, the token
    budget and the padding fraction: on a CPU, padding costs as much as real tokens."""
    i = 0
    while i < len(rows):
        width, real, j = len(rows[i].tokens), len(rows[i].tokens), i + 1
        while j < len(rows) and j - i < batch_size and (j - i + 1) * width <= max_batch_tokens:
            grown = real + len(rows[j].tokens)
            if 1 - grown / ((j - i + 1) * width) > max_padding:
                break
            real, j = grown, j + 1
        yield rows[i:j]
        i = j


def _attention_mask(batch: list[Row], width: int, device, float_dtype: torch.dtype | None):
    """A 2D padding mask when no row branches, else a 4D mask (bool, or additive ``float_dtype``)."""
    valid = torch.zeros(len(batch), width, dtype=torch.bool)
    for b, r in enumerate(batch):
        valid[b, :len(r.tokens)] = True
    if all(max(r.segments) == 0 for r in batch):
        return valid.long().to(device)
    seg = torch.full((len(batch), width), -1, dtype=torch.long)
    for b, r in enumerate(batch):
        seg[b, :len(r.tokens)] = torch.tensor(r.segments)
    ar = torch.arange(width)
    causal = ar[None, :] <= ar[:, None]                                      # [q, k]
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])     # [b, q, k]
    allowed = causal[None] & same & valid[:, None, :]
    allowed |= torch.eye(width, dtype=torch.bool)[None]                      # padding sees itself
    allowed = allowed[:, None].to(device)
    if float_dtype is None:
        return allowed
    zero = torch.zeros((), dtype=float_dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(float_dtype).min)


def _compute_dtype(model) -> torch.dtype:
    if torch.is_autocast_enabled(next(model.parameters()).device.type):
        return torch.get_autocast_dtype(next(model.parameters()).device.type)
    return next(model.parameters()).dtype


def _hidden_and_head(model):
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings()
    if body is None or body is model or head is None:
        return None, None
    return body, head


HEAD_SLICE = 2048   # scored positions per output-projection call: bounds the [n, vocab] logits


def _forward_scored(model, batch: list[Row], fast: bool):
    """Run a batch; yield (float32 log-probs [n, V], the scored entries they belong to) in slices.

    The fast path keeps the trunk's hidden states at the scored positions only (each distinct
    position once) and applies the output projection slice by slice.
    """
    device = next(model.parameters()).device
    width = len(batch[0].tokens)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    pos = torch.zeros(len(batch), width, dtype=torch.long)
    for b, r in enumerate(batch):
        ids[b, :len(r.tokens)] = torch.tensor(r.tokens)
        pos[b, :len(r.tokens)] = torch.tensor(r.positions)
    unique: dict[tuple[int, int], int] = {}
    entries: list[list] = []      # per distinct position, its scored entries
    for b, r in enumerate(batch):
        for s in r.scored:
            u = unique.setdefault((b, s[0]), len(unique))
            if u == len(entries):
                entries.append([])
            entries[u].append(s)
    bi = torch.tensor([k[0] for k in unique], device=device)
    pi = torch.tensor([k[1] for k in unique], device=device)
    attn = model.config._attn_implementation
    mask = _attention_mask(batch, width, device, None if attn == "sdpa" else _compute_dtype(model))
    ids, pos = ids.to(device), pos.to(device)
    if fast:
        body, head = _hidden_and_head(model)
        hidden = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)[0][bi, pi]
    else:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[bi, pi]
    for a in range(0, len(unique), HEAD_SLICE):
        part = hidden[a:a + HEAD_SLICE] if fast else None
        lg = head(part) if fast else logits[a:a + HEAD_SLICE]
        logp = torch.log_softmax(lg.float(), dim=-1)
        counts = [len(e) for e in entries[a:a + HEAD_SLICE]]
        if any(c > 1 for c in counts):   # a position shared by several requests (first tokens)
            logp = logp[torch.repeat_interleave(torch.arange(len(counts), device=device),
                                                torch.tensor(counts, device=device))]
        yield logp, [s for e in entries[a:a + HEAD_SLICE] for s in e]


_FAST_OK: set = set()


def _fast_key(model) -> tuple:
    cfg = model.config
    digest = hashlib.sha1(cfg.to_json_string(use_diff=False).encode()).hexdigest()
    dev = next(model.parameters()).device.type
    body, head = _hidden_and_head(model)
    return (type(model), type(body), type(head), cfg._attn_implementation, digest, str(_compute_dtype(model)), dev)


@torch.inference_mode()
def fast_path_ok(model) -> bool:
    """Whether packed rows + head-only projection reproduce a plain forward pass for this model."""
    if model.config._attn_implementation not in ("sdpa", "eager"):
        return False
    if _hidden_and_head(model)[0] is None:
        return False
    key = _fast_key(model)
    if key in _FAST_OK:
        return True
    vocab = min(getattr(model.config.get_text_config(), "vocab_size", None) or 100, 1 << 20)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, vocab, (7,), generator=g).tolist()
    conts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (3, 1, 2)]
    reqs = [(ctx, c) for c in conts] + [(ctx[:3], conts[0])]
    try:
        fast = _run(model, reqs, True, 8, 1 << 16, loglik_reducer, None, max_padding=1.0)  # one padded batch
    except Exception:  # noqa: BLE001 (a trunk that refuses 4D masks or position ids: use the plain path)
        return False
    ref = [reference_logprobs(model, c, k) for c, k in reqs]
    diffs = [(f[:, 0] - r).abs().max().item() for f, r in zip(fast, ref)]
    if not all(torch.isfinite(r).all() for r in ref):
        return True  # a broken model (NaN weights): nothing to compare, nothing cached
    tol = 1e-3 if _compute_dtype(model) == torch.float32 else 0.15
    if max(diffs) > tol:
        return False
    _FAST_OK.add(key)
    return True


@torch.inference_mode()
def reference_logprobs(model, context: Ids, continuation: Ids) -> torch.Tensor:
    """Plain reference: one full forward of context+continuation, log_softmax, gather (float64)."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(context) + list(continuation)], device=device)
    logits = model(input_ids=ids, use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    c = len(context)
    tgt = torch.tensor(list(continuation), device=device)
    return logp[c - 1:c - 1 + len(continuation)].gather(1, tgt[:, None])[:, 0].double().cpu()


def _run(model, requests, fast: bool, batch_size: int, max_batch_tokens: int, reducer: Reducer,
         progress: Callable[[int], None] | None, max_padding: float = 0.1) -> list[torch.Tensor]:
    rows = build_rows(requests, packed=fast, max_length=model_max_length(model))
    results: list[list] = [[None] * len(k) for _, k in requests]
    if not fast:   # the plain path materializes [batch, width, vocab] logits
        max_batch_tokens = min(max_batch_tokens, 4096)
    for batch in _batches(rows, batch_size, max_batch_tokens, max_padding):
        for logp, entries in _forward_scored(model, batch, fast):
            targets = torch.tensor([s[1] for s in entries], device=logp.device)
            owners = [(s[2], s[3]) for s in entries]
            values = reducer(logp, targets, owners).double().cpu()
            for (req, tok), v in zip(owners, values):
                results[req][tok] = v
        if progress is not None:
            progress(sum(r.requests for r in batch))
    return [torch.stack(r) for r in results]


@torch.inference_mode()
def score_requests(model, requests: Sequence[tuple[Ids, Ids]], *, batch_size: int = 32,
                   max_batch_tokens: int = 16384, reducer: Reducer = loglik_reducer,
                   progress: Callable[[int], None] | None = None, fast: bool | None = None,
                   max_padding: float | None = None) -> list[torch.Tensor]:
    """Per request, a float64 tensor [len(continuation), m] of the reducer's per-token values.

    A batch holds at most ``batch_size`` rows, ``max_batch_tokens`` padded tokens and a
    ``max_padding`` fraction of padding (default 0.1 on CPU, 0.5 elsewhere).

    With the default reducer, column 0 is the token's log-prob and column 1 whether it was the
    greedy choice: ``out[i][:, 0].sum()`` is request i's log-likelihood.
    """
    if not requests:
        return []
    if fast is None:
        fast = fast_path_ok(model)
    if max_padding is None:   # CPUs pay for padding; accelerators prefer full batches
        max_padding = 0.1 if next(model.parameters()).device.type == "cpu" else 0.5
    return _run(model, requests, fast, batch_size, max_batch_tokens, reducer, progress, max_padding)


def loglikelihoods(model, requests: Sequence[tuple[Ids, Ids]], **kw) -> list[tuple[float, bool]]:
    """``(sum of continuation log-probs, all tokens greedy)`` per request, lm-eval's loglikelihood."""
    return [(float(v[:, 0].sum()), bool(v[:, 1].all())) for v in score_requests(model, requests, **kw)]
