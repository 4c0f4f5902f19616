"""Token embeddings and output head stored in bfloat16, with float32 activations around them.

Half the bytes of the largest float tensors of a small model (SmolLM2: 49152 x 576, tied), and a
bfloat16 output projection reads half as much memory per decoded token. The embedding lookup returns
float32, so the rest of the model keeps computing in float32; the head multiplies in bfloat16
(float32 accumulation) and returns float32 logits. A tied head keeps sharing the embedding's weight.
"""

from __future__ import annotations

import torch
from torch import nn


class BFloat16Embedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


class BFloat16Head(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        return nn.functional.linear(x.to(torch.bfloat16), self.weight, bias).float()


def cast_embeddings(model: nn.Module, dtype: str) -> None:
    """Give `model` bfloat16 input embeddings and output head (`dtype` "bfloat16"); "float32": no change.

    Weights are left as they are (random) when the model is being rebuilt for loading."""
    if dtype == "float32":
        return
    if dtype != "bfloat16":
        raise ValueError(f"embeddings: expected 'float32' or 'bfloat16', got {dtype!r}")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    new_emb = BFloat16Embedding(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx,
                                device="meta")
    new_emb.weight = nn.Parameter(emb.weight.detach().to(torch.bfloat16), requires_grad=False)
    model.set_input_embeddings(new_emb)
    if head is not None and isinstance(head, nn.Linear):
        new_head = BFloat16Head(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        new_head.weight = new_emb.weight if tied else nn.Parameter(head.weight.detach().to(torch.bfloat16),
                                                                   requires_grad=False)
        if head.bias is not None:
            new_head.bias = nn.Parameter(head.bias.detach().float(), requires_grad=False)
        model.set_output_embeddings(new_head)
