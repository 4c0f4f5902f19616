"""The knobs of a recovery run (kept free of torch so the CLI parser builds fast)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RecoverOptions:
    steps: int = 200  # end-to-end KL steps
    block_steps: int = 40  # reconstruction steps per decoder block (0: skip the phase)
    lr: float = 5e-4  # adapters, end to end
    block_lr: float = 1e-3  # adapters, block phase
    scale_lr: float = 5e-5  # scales and zeros (0: frozen)
    seq_len: int = 256
    batch_size: int = 4
    max_tokens: int = 49152  # calibration tokens for the end-to-end phase
    block_tokens: int = 16384  # calibration tokens for the block phase (a subset of the above)
    top_k: int = 64
    dtype: str = "bfloat16"  # autocast dtype of forward passes (bfloat16 or float32)
    # Seconds for the whole run (loading, teacher cache, both phases); the final save and held-out
    # evaluation come on top. None: run every step.
    time_budget: float | None = None
    block_fraction: float = 0.3  # share of the training time (the budget left after loading) for the block phase
    cache_fraction: float = 0.5  # most of the end-to-end share the teacher's top-k cache may take
    checkpoint_every: int = 25
    snapshot_every: float | None = None  # seconds between snapshots of the adapters (None: none)
    seed: int = 0
