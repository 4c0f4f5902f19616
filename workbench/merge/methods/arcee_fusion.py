"""Arcee Fusion: keep the other model's value only where it matters: where its change from the
base, times the KL divergence of the softmaxed rows (other vs base), is an upper outlier of that
importance (at least median + 1.5 IQR); elsewhere keep the base."""

from __future__ import annotations

import torch

from .base import MergeMethod, MergeParams, register
from .common import expect_models

PARAMS: dict = {}


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - base| times KL(softmax(x) || softmax(base)) of its row (softmax over the last dim)."""
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (x - base).abs() * kl


def quantile(flat: torch.Tensor, q: float) -> torch.Tensor:
    """The entry at index floor(q * (n - 1)) of ``flat`` sorted ascending (NaN sorts last)."""
    return torch.kthvalue(flat, int(q * (flat.numel() - 1)) + 1).values


def arcee_fusion(base: torch.Tensor | None, tensors: list[torch.Tensor], params: MergeParams) -> torch.Tensor:
    if base is None:
        raise ValueError("arcee_fusion: needs a base model")
    expect_models("arcee_fusion", tensors, 1)
    other = tensors[0]
    score = importance(other, base)
    flat = score.reshape(-1)
    q1, median, q3 = (quantile(flat, q) for q in (0.25, 0.5, 0.75))
    keep = (score >= median + 1.5 * (q3 - q1)).to(base.dtype)
    return base + (other - base) * keep


register(MergeMethod(
    name="arcee_fusion", fn=arcee_fusion, params=PARAMS, base="required", min_models=1, max_models=1,
    reference="https://arcee.ai",
))
