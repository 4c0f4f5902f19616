"""Model Stock: move from the base toward the average of N fine-tunes by t = N cos / (1 + (N-1) cos),
where cos is the mean pairwise cosine between their deltas (whole tensor, or per row)."""

from __future__ import annotations

import torch

from .base import MergeMethod, MergeParams, ParamSpec, register
from .common import resolve

PARAMS = {"filter_wise": ParamSpec(bool, False, help="one t per row (last dim) instead of per tensor")}


def model_stock(base: torch.Tensor | None, tensors: list[torch.Tensor], params: MergeParams) -> torch.Tensor:
    if base is None:
        raise ValueError("model_stock: needs a base model")
    if len(tensors) < 2:
        raise ValueError(f"model_stock: needs at least 2 non-base models, got {len(tensors)}")
    shared, _ = resolve("model_stock", params, PARAMS, len(tensors))
    if shared["filter_wise"]:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
    else:
        w0 = base.reshape(-1)
    ws = [x.reshape(w0.shape) for x in tensors]
    deltas = [w - w0 for w in ws]

    cosines = []
    for i, a in enumerate(deltas):
        for b in deltas[i + 1 :]:
            norms = (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)

    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base there
    t = torch.where(singular, 0, n * cos / torch.where(singular, 1, denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(base.shape)


register(MergeMethod(
    name="model_stock", fn=model_stock, params=PARAMS, base="required", min_models=2,
    reference="https://arxiv.org/abs/2403.19522",
))
