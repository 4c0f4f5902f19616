"""Batched log-likelihoods: the transformer trunk once per context, the LM head only where scored.

Requests that share a context are packed into one row: the context once, then the
continuations' tokens (all but the last) as a tree, each token seeing the context and its own
ancestors, through a 4D attention mask and explicit position ids. Continuations that start
alike ("quarante-sept." and "quarante-huit.") share the nodes of their common start, so a row
costs the context plus the distinct continuation prefixes, instead of ``n * len(context) + ...``;
when every continuation is one token, the row is just the context and all choices are read from
its last position. Rows are sorted longest first and padded on the right. The trunk's hidden states
are gathered at the scored positions only, and only there is the output projection applied.

A prefix that every row starts with (a chat template's system prompt, shared few-shot examples)
runs once per call: its keys and values are cached and repeated over each batch, and the rows
keep only what follows it (their position ids stay absolute). With SmolLM2's chat template that is
about 40% of a short item's tokens.

The packed path is checked once per model class/config against a plain forward pass (full
logits, ``log_softmax``, gather); a model it does not reproduce (ALiBi, logit soft-capping, ...)
is scored the plain way instead.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.models.anatomy import body_and_head, cache_kwarg

Ids = Sequence[int]
# reducer(logprobs [u, V] float32 (one row per distinct scored position), rows [n] (each entry's
# row in logprobs), targets [n], owners [(request, token)]) -> values [n, m]
Reducer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]], torch.Tensor]


def loglik_reducer(logp: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, owners) -> torch.Tensor:
    """Per token: (log-prob of the target, 1.0 if the target is the argmax)."""
    tok = logp[rows, targets]
    greedy = (logp.argmax(1)[rows] == targets).to(logp.dtype)
    return torch.stack([tok, greedy], 1)


@dataclass
class Row:
    tokens: list[int]
    positions: list[int]
    parents: list[int]                        # row index of each token's predecessor, -1 for the first
    context: int                              # the first ``context`` tokens are the shared context
    scored: list[tuple[int, int, int, int]]   # (row position, target, request, token index)
    requests: int                             # how many requests the row finishes

    def branches(self) -> bool:
        return any(p != i - 1 for i, p in enumerate(self.parents))


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
        tokens, positions, parents = list(ctx), list(range(c)), list(range(-1, c - 1))
        nodes: dict[tuple[int, int], int] = {}   # (parent, token) -> row index: the continuation tree
        scored = []
        for i in idx:
            cont = list(requests[i][1])
            at = c - 1   # the row index whose hidden state predicts the next token
            for j, t in enumerate(cont):
                scored.append((at, t, i, j))
                if j == len(cont) - 1:
                    break
                if (at, t) not in nodes:
                    nodes[(at, t)] = len(tokens)
                    tokens.append(t)
                    positions.append(positions[at] + 1)
                    parents.append(at)
                at = nodes[(at, t)]
        rows.append(Row(tokens, positions, parents, c, scored, len(idx)))
    rows.sort(key=lambda r: -len(r.tokens))
    return rows


MIN_SHARED_PREFIX = 8   # tokens; below this the cache copy costs more than it saves


def shared_prefix_length(rows: list[Row]) -> int:
    """Tokens that every row starts with, leaving each row at least its last context token
    (whose hidden state predicts the first continuation token)."""
    if len(rows) < 2:
        return 0
    limit = min(r.context for r in rows) - 1
    first = rows[0].tokens
    n = 0
    while n < limit and all(r.tokens[n] == first[n] for r in rows):
        n += 1
    return n


def strip_prefix(row: Row, n: int) -> Row:
    """The row without its first ``n`` tokens (positions stay absolute)."""
    return Row(row.tokens[n:], row.positions[n:], [p - n if p >= n else -1 for p in row.parents[n:]],
               row.context - n, [(p - n, t, req, j) for p, t, req, j in row.scored], row.requests)


@dataclass
class Prefix:
    length: int
    cache: object   # a transformers Cache holding the prefix's keys and values, batch 1

    def for_batch(self, size: int):
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(size)
        return cache


def _run_prefix(body, tokens: list[int], device) -> Prefix:
    ids = torch.tensor([tokens], device=device)
    out = body(input_ids=ids, position_ids=torch.arange(len(tokens), device=device)[None], use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    return Prefix(len(tokens), cache)


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


def _attention_mask(batch: list[Row], width: int, device, float_dtype: torch.dtype | None, prefix: int = 0):
    """A 2D padding mask when no row branches, else a 4D mask (bool, or additive ``float_dtype``).

    ``prefix``: cached tokens before the rows, which every position sees.
    """
    valid = torch.zeros(len(batch), width, dtype=torch.bool)
    for b, r in enumerate(batch):
        valid[b, :len(r.tokens)] = True
    if not any(r.branches() for r in batch):
        return torch.cat([torch.ones(len(batch), prefix, dtype=torch.bool), valid], 1).long().to(device)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(batch), 1, 1)   # [b, q, k]; padding sees itself
    for b, r in enumerate(batch):
        allowed[b, :r.context, :r.context] = torch.ones(r.context, r.context, dtype=torch.bool).tril()
        for i in range(r.context, len(r.tokens)):   # a tree token sees its ancestors and itself
            allowed[b, i] |= allowed[b, r.parents[i]]
    allowed = torch.cat([torch.ones(len(batch), width, prefix, dtype=torch.bool), allowed], 2)
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
    """(body, head), or (None, None) for a model without them (scored by a full forward)."""
    try:
        return body_and_head(model)
    except ValueError:
        return None, None


HEAD_SLICE = 2048   # scored positions per output-projection call: bounds the [n, vocab] logits


def _forward_scored(model, batch: list[Row], fast: bool, prefix: Prefix | None = None):
    """Run a batch; yield (float32 log-probs [u, V] of distinct positions, each entry's row in
    them, the scored entries) in slices.

    The fast path keeps the trunk's hidden states at the scored positions only (each distinct
    position once) and applies the output projection slice by slice, after the cached ``prefix``
    when there is one.
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
    n_prefix = prefix.length if prefix is not None else 0
    mask = _attention_mask(batch, width, device, None if attn == "sdpa" else _compute_dtype(model), n_prefix)
    ids, pos = ids.to(device), pos.to(device)
    if fast:
        body, head = _hidden_and_head(model)
        cached = {cache_kwarg(body): prefix.for_batch(len(batch)), "use_cache": True} if prefix else {"use_cache": False}
        hidden = body(input_ids=ids, attention_mask=mask, position_ids=pos, **cached)[0][bi, pi]
    else:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[bi, pi]
    for a in range(0, len(unique), HEAD_SLICE):
        part = hidden[a:a + HEAD_SLICE] if fast else None
        lg = head(part) if fast else logits[a:a + HEAD_SLICE]
        logp = torch.log_softmax(lg.float(), dim=-1)
        counts = torch.tensor([len(e) for e in entries[a:a + HEAD_SLICE]], device=device)
        rows = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)  # shared positions
        yield logp, rows, [s for e in entries[a:a + HEAD_SLICE] for s in e]


_FAST_MODE: dict[tuple, bool] = {}   # model key -> whether the shared-prefix cache reproduces it too


def _fast_key(model) -> tuple:
    cfg = model.config
    digest = hashlib.sha1(cfg.to_json_string(use_diff=False).encode()).hexdigest()
    dev = next(model.parameters()).device.type
    body, head = _hidden_and_head(model)
    return (type(model), type(body), type(head), cfg._attn_implementation, digest, str(_compute_dtype(model)), dev)


@torch.inference_mode()
def fast_path_ok(model) -> bool:
    """Whether packed rows + head-only projection reproduce a plain forward pass for this model."""
    return fast_mode(model) is not None


@torch.inference_mode()
def fast_mode(model) -> bool | None:
    """None: score the plain way; False: packed rows; True: packed rows after a shared-prefix cache.

    Each is checked once per model key against :func:`reference_logprobs` on random tokens.
    """
    if model.config._attn_implementation not in ("sdpa", "eager"):
        return None
    if _hidden_and_head(model)[0] is None:
        return None
    key = _fast_key(model)
    if key in _FAST_MODE:
        return _FAST_MODE[key]
    vocab = min(getattr(model.config.get_text_config(), "vocab_size", None) or 100, 1 << 20)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, vocab, (7,), generator=g).tolist()
    conts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (3, 1, 2)]
    reqs = [(ctx, c) for c in conts] + [(ctx[:3], conts[0])]   # rows share a 2-token prefix
    ref = [reference_logprobs(model, c, k) for c, k in reqs]
    if not all(torch.isfinite(r).all() for r in ref):
        return False  # a broken model (NaN weights): nothing to compare, nothing cached
    tol = 1e-3 if _compute_dtype(model) == torch.float32 else 0.15
    for share in (True, False):
        try:   # one padded batch
            fast = _run(model, reqs, True, 8, 1 << 16, loglik_reducer, None, max_padding=1.0,
                        min_prefix=1 if share else None)
        except Exception:  # noqa: BLE001 (a trunk that refuses 4D masks, position ids or a cache)
            continue
        if max((f[:, 0] - r).abs().max().item() for f, r in zip(fast, ref)) <= tol:
            _FAST_MODE[key] = share
            return share
    return None


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
         progress: Callable[[int], None] | None, max_padding: float = 0.1,
         min_prefix: int | None = MIN_SHARED_PREFIX) -> list[torch.Tensor]:
    """Score ``requests``; ``min_prefix``: share a common prefix of at least this many tokens
    through a cache (fast path only; None: never)."""
    rows = build_rows(requests, packed=fast, max_length=model_max_length(model))
    results: list[list] = [[None] * len(k) for _, k in requests]
    if not fast:   # the plain path materializes [batch, width, vocab] logits
        max_batch_tokens = min(max_batch_tokens, 4096)
    prefix = None
    n = shared_prefix_length(rows) if fast and min_prefix is not None else 0
    if n and n >= min_prefix:
        prefix = _run_prefix(_hidden_and_head(model)[0], rows[0].tokens[:n], next(model.parameters()).device)
        rows = [strip_prefix(r, n) for r in rows]
    for batch in _batches(rows, batch_size, max_batch_tokens, max_padding):
        for logp, at, entries in _forward_scored(model, batch, fast, prefix):
            targets = torch.tensor([s[1] for s in entries], device=logp.device)
            owners = [(s[2], s[3]) for s in entries]
            values = reducer(logp, at, targets, owners).double().cpu()
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
    mode = fast_mode(model)
    if fast is None:
        fast = mode is not None
    if max_padding is None:   # CPUs pay for padding; accelerators prefer full batches
        max_padding = 0.1 if next(model.parameters()).device.type == "cpu" else 0.5
    min_prefix = MIN_SHARED_PREFIX if (fast and mode) else None
    return _run(model, requests, fast, batch_size, max_batch_tokens, reducer, progress, max_padding, min_prefix)


def loglikelihoods(model, requests: Sequence[tuple[Ids, Ids]], **kw) -> list[tuple[float, bool]]:
    """``(sum of continuation log-probs, all tokens greedy)`` per request, lm-eval's loglikelihood."""
    return [(float(v[:, 0].sum()), bool(v[:, 1].all())) for v in score_requests(model, requests, **kw)]
