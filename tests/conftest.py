"""Shared fixtures: tiny random models built from transformers configs, saved as safetensors.

Nothing here downloads anything; every model is made from a config with a fixed seed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 96


def tiny_config(arch: str, num_layers: int = 4):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           tie_word_embeddings=True, **common)
    if arch == "mistral":
        return MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             sliding_window=None, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=num_layers, n_head=4, n_positions=128, **common)
    raise ValueError(arch)


def tiny_tokenizer():
    """A word-level tokenizer whose vocabulary matches the tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_model(path: Path, arch: str = "llama", seed: int = 0, num_layers: int = 4,
                    base: Path | None = None, delta_scale: float = 0.02, **save_kwargs) -> Path:
    """Save a tiny random model. With ``base``, it is ``base`` plus a seeded random task vector."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * delta_scale)
    else:
        model = AutoModelForCausalLM.from_config(tiny_config(arch, num_layers))
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_models(tmp_path):
    """A factory: ``tiny_models(arch, n)`` -> [base, variant1, ..., variant(n-1)] directories."""

    def make(arch: str = "llama", n: int = 3, num_layers: int = 4) -> list[Path]:
        base = save_tiny_model(tmp_path / f"{arch}-base", arch, seed=0, num_layers=num_layers)
        return [base] + [save_tiny_model(tmp_path / f"{arch}-v{i}", arch, seed=i, base=base)
                         for i in range(1, n)]

    return make


def write_quant_inputs(d: Path) -> tuple[Path, Path, Path]:
    """A 2-bit LoRA config, a held-out perplexity task and a calibration text for the tiny models:
    (config, task header, corpus) in ``d``."""
    cfg = d / "q.yml"
    cfg.write_text("bits: 2\ngroup_size: 16\nlora: {rank: 2}\n")
    words = [f"w{i}" for i in range(3, VOCAB)]
    (d / "ppl.jsonl").write_text("".join(json.dumps({"split": "heldout", "text": " ".join(words[i::7])}) + "\n"
                                         for i in range(7)))
    task = d / "ppl.yml"
    task.write_text("name: tiny-ppl\ntype: perplexity\nitems: ppl.jsonl\nmax_length: 32\nstride: 32\n")
    corpus = d / "corpus.txt"
    corpus.write_text(" ".join(f"w{i % 90 + 3}" for i in range(3000)))  # tiny vocabulary words
    return cfg, task, corpus


def write_tiny_task(path: Path, n: int = 12) -> Path:
    """A 2-choice task for the tiny word-level tokenizer: which word follows (a seeded rule)."""
    rng = np.random.default_rng(0)
    lines = []
    for i, a in enumerate(rng.permutation(np.arange(3, 90))[: 2 * n].tolist()):
        gold = int(rng.integers(0, 2))
        choices = [f"w{a + 1}", f"w{a + 2}"] if gold == 0 else [f"w{a + 2}", f"w{a + 1}"]
        lines.append(json.dumps({"split": "search" if i < n else "heldout", "context": f"w{a} w{a}",
                                 "choices": choices, "gold": gold}))
    (path.parent / "tiny.jsonl").write_text("\n".join(lines) + "\n")
    path.write_text("name: tiny\ntype: multiple_choice\ndescription: a test task\nitems: tiny.jsonl\n")
    return path
