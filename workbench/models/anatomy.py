"""Where the parts of a transformers causal LM are: its decoder blocks, its body (embeddings,
blocks, final norm: ``model.base_model``) and its output head. One place for every module that
takes a model apart (evaluation, recovery, zoo training)."""

from __future__ import annotations

import inspect

from torch import nn


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the body returning last hidden states, the output projection)."""
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or head is None:
        raise ValueError(f"{type(model).__name__}: expected a causal LM with a body and an output head")
    return body, head


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (the longest ModuleList)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no list of decoder blocks found")
    return max(lists, key=len)


def cache_kwarg(body: nn.Module) -> str:
    """The body's key/value cache argument: transformers 5.24 renamed ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
