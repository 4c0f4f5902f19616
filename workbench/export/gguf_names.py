"""llama.cpp conventions the GGUF export follows: architectures, tensor names, the Q/K row permutation,
the model hyper-parameter keys and the BPE pre-tokenizer names.

Facts taken from gguf-py 0.19 (`MODEL_TENSORS`, `TENSOR_NAMES`) and llama.cpp's `convert_hf_to_gguf.py`:

* HF ``LlamaForCausalLM`` and ``MistralForCausalLM`` are both the GGUF ``llama`` architecture;
  ``Qwen2ForCausalLM`` is ``qwen2``.
* For ``llama`` the converter permutes the rows of q_proj and k_proj (weight and bias): HF pairs
  dimension i with i + d/2 of each head (rotate-half RoPE), llama.cpp's llama RoPE pairs 2i with 2i+1.
  ``qwen2`` uses NeoX-style RoPE in llama.cpp and is written unpermuted.
* The pre-tokenizer of a BPE vocabulary is named by hashing the token ids of a fixed probe text.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES

from workbench.errors import WorkbenchError


class GGUFExportError(WorkbenchError, ValueError):
    """A model, adapter or file the GGUF export cannot handle."""


# HF `model_type` -> gguf-py architecture
ARCHS: dict[str, MODEL_ARCH] = {"llama": MODEL_ARCH.LLAMA, "mistral": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2}

_GLOBAL = {"model.embed_tokens": MODEL_TENSOR.TOKEN_EMBD, "model.norm": MODEL_TENSOR.OUTPUT_NORM,
           "lm_head": MODEL_TENSOR.OUTPUT}
_BLOCK = {"input_layernorm": MODEL_TENSOR.ATTN_NORM, "self_attn.q_proj": MODEL_TENSOR.ATTN_Q,
          "self_attn.k_proj": MODEL_TENSOR.ATTN_K, "self_attn.v_proj": MODEL_TENSOR.ATTN_V,
          "self_attn.o_proj": MODEL_TENSOR.ATTN_OUT, "post_attention_layernorm": MODEL_TENSOR.FFN_NORM,
          "mlp.gate_proj": MODEL_TENSOR.FFN_GATE, "mlp.up_proj": MODEL_TENSOR.FFN_UP,
          "mlp.down_proj": MODEL_TENSOR.FFN_DOWN}
_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_arch(config: dict[str, Any], where: str) -> MODEL_ARCH:
    """The GGUF architecture of an HF config, or a clear error naming the unsupported one."""
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        archs = ", ".join(config.get("architectures") or []) or "?"
        raise GGUFExportError(f"{where}: architecture {model_type!r} ({archs}) cannot be exported to GGUF; "
                              f"supported: {', '.join(sorted(ARCHS))}")
    return ARCHS[model_type]


def arch_name(arch: MODEL_ARCH) -> str:
    return MODEL_ARCH_NAMES[arch]


def gguf_module(arch: MODEL_ARCH, module: str) -> str | None:
    """HF module name -> GGUF tensor base name (no ``.weight``), e.g. ``blk.0.attn_q``; None if unknown."""
    key, bid = _GLOBAL.get(module), None
    if key is None and (m := _BLOCK_RE.match(module)):
        bid, key = int(m.group(1)), _BLOCK.get(m.group(2))
    if key is None or key not in MODEL_TENSORS[arch]:
        return None
    return TENSOR_NAMES[key].format(bid=bid) if bid is not None else TENSOR_NAMES[key]


def hf_module(gguf_base: str) -> str | None:
    """GGUF tensor base name -> HF module name (inverse of `gguf_module`)."""
    for module, key in _GLOBAL.items():
        if TENSOR_NAMES[key] == gguf_base:
            return module
    m = re.match(r"^blk\.(\d+)\.(.+)$", gguf_base)
    if m:
        for suffix, key in _BLOCK.items():
            if TENSOR_NAMES[key] == f"blk.{{bid}}.{m.group(2)}":
                return f"model.layers.{m.group(1)}.{suffix}"
    return None


def split_name(name: str) -> tuple[str, str]:
    """``model.layers.0.mlp.up_proj.weight`` -> (``model.layers.0.mlp.up_proj``, ``weight``)."""
    module, _, leaf = name.rpartition(".")
    return module, leaf


def qk_heads(arch: MODEL_ARCH, module: str, n_head: int, n_head_kv: int) -> int | None:
    """The head count to permute rows with (q: n_head, k: n_head_kv), or None when not permuted."""
    if arch != MODEL_ARCH.LLAMA:
        return None
    if module.endswith("self_attn.q_proj"):
        return n_head
    if module.endswith("self_attn.k_proj"):
        return n_head_kv
    return None


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved order, per head (rows of a weight, bias or lora_B)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_rows`."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hparams(config: dict[str, Any]) -> dict[str, Any]:
    """The numbers llama.cpp reads for llama / qwen2, from an HF config.json (transformers 4 or 5 layout)."""
    n_head = config["num_attention_heads"]
    rope = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    return {
        "context_length": config.get("max_position_embeddings"),
        "embedding_length": config["hidden_size"],
        "block_count": config["num_hidden_layers"],
        "feed_forward_length": config["intermediate_size"],
        "head_count": n_head,
        "head_count_kv": config.get("num_key_value_heads") or n_head,
        "head_dim": config.get("head_dim") or config["hidden_size"] // n_head,
        "rope_theta": config.get("rope_theta", rope.get("rope_theta", 10000.0)),
        "rms_norm_eps": config.get("rms_norm_eps", 1e-6),
        "vocab_size": config["vocab_size"],
        "rope_scaling": scaling,
        "tied": bool(config.get("tie_word_embeddings", False)),
    }


def llama3_rope_factors(scaling: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp uses for Llama-3.1 style ("llama3") RoPE scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))
    return out.astype(np.float32)


# BPE pre-tokenizers llama.cpp knows, by sha256 of str(token ids of PRE_TOKENIZER_PROBE) (the hashes
# llama.cpp's convert_hf_to_gguf.py uses; "smollm" checked here against SmolLM2-135M's tokenizer).
PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
}
