"""Export a quantized model directory (`workbench.quant.model.save_quantized`) to GGUF for llama.cpp.

* `export_gguf` writes the quantized **base** (adapters left out). A ternary layer becomes TQ2_0 or
  TQ1_0 when every 256-weight TQ block lies inside one of our groups (group_size a multiple of 256):
  the block's absmax is then our float16 scale, so `gguf.quants.quantize` of our dequantized weight
  reproduces our values exactly (checked for every tensor). Any other quantized layer (other group
  sizes, rows not a multiple of 256, 1-4 bit asymmetric: gguf-py cannot write Q2_K/Q3_K/Q4_K) falls
  back, and the report lists each with the reason and the error read back. The default fallback
  ``Q4`` is the most compact type that holds our values: a ternary group of a multiple of 32 is
  exactly a Q4_0 block run (d = our scale, q = t + 8; 4.5 bits per weight), and 1-4 bit codes are a
  Q4_1 block run (d = scale, m = float16(-scale x zero); 5 bits per weight), exact up to the float16
  rounding of m, whose error is measured and reported. Layers no Q4 block fits (a group not a
  multiple of 32) and the ``F16`` / ``Q8_0`` fallbacks store the dequantized weight. Embeddings
  and output are F16 (output omitted when tied), norms and biases F32.
* `export_lora_gguf` writes the adapters in llama.cpp's LoRA GGUF format (``general.type=adapter``,
  ``adapter.type=lora``, ``adapter.lora.alpha``; ``<base>.lora_a`` [r, in] and ``<base>.lora_b``
  [out, r] as numpy shapes, i.e. ggml ne [in, r] and [r, out]). llama.cpp scales by alpha / rank.
* `read_gguf_weights` / `gguf_weights_as_hf` read files back (float32), undoing the Q/K permutation.

Outputs are written to a temporary file beside the target and renamed into place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from safetensors.torch import load_file

from workbench.atomic import atomic_path, atomic_paths
from workbench.faults import fault_point
from workbench.export.gguf_names import (
    PRE_TOKENIZER_PROBE,
    PRE_TOKENIZERS,
    GGUFExportError,
    arch_name,
    gguf_arch,
    gguf_module,
    hf_module,
    hparams,
    llama3_rope_factors,
    permute_rows,
    qk_heads,
    split_name,
    unpermute_rows,
)
from workbench.quant import packing
from workbench.quant.linear import QuantLinear
from workbench.quant.model import read_quant_meta
from workbench.quant.quantizers import dequantize

__all__ = [
    "GGUFExportError",
    "export_gguf",
    "export_lora_gguf",
    "gguf_weights_as_hf",
    "read_gguf_metadata",
    "read_gguf_weights",
]

TQ_BLOCK = 256
TERNARY_TYPES = {"TQ2_0": QT.TQ2_0, "TQ1_0": QT.TQ1_0}
FALLBACK_TYPES = {"Q4": QT.Q4_0, "F16": QT.F16, "Q8_0": QT.Q8_0}  # Q4: Q4_0 (ternary) / Q4_1 (asymmetric)
Q4_BLOCK = 32
FILE_TYPES = {QT.TQ2_0: gguf.LlamaFileType.MOSTLY_TQ2_0, QT.TQ1_0: gguf.LlamaFileType.MOSTLY_TQ1_0,
              QT.F16: gguf.LlamaFileType.MOSTLY_F16, QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
              QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}

Progress = Callable[[str, int, int], None]


# -- reading the quantized directory -------------------------------------------------------------------

class _Source:
    """config.json, quant_config.json and the tensors of a quantized directory."""

    def __init__(self, qdir: str | Path):
        self.qdir = Path(qdir)
        self.meta = read_quant_meta(self.qdir)
        self.config = json.loads((self.qdir / "config.json").read_text())
        self.arch = gguf_arch(self.config, str(self.qdir / "config.json"))
        self.hp = hparams(self.config)
        path = self.qdir / "model.safetensors"
        if not path.is_file():
            raise GGUFExportError(f"{path}: missing; the quantized directory is incomplete")
        self.tensors = load_file(str(path))
        self.layers: dict[str, dict] = self.meta["layers"]

    def quant_linear(self, name: str) -> QuantLinear:
        """Rebuild one `QuantLinear` (codes, scales, zeros, bias, adapters) from the saved tensors."""
        e = self.layers[name]
        m = QuantLinear(e["in_features"], e["out_features"], e["kind"], e["bits"], e["group_size"], e["bias"],
                        e["lora_rank"], e["lora_alpha"])
        state = {k[len(name) + 1:]: v for k, v in self.tensors.items() if k.startswith(name + ".")}
        if e.get("storage") == "trits" and "qweight" in state:
            state["qweight"] = packing.pack_2bit(packing.unpack_trits(state["qweight"], e["in_features"]), pad=1)
        state = {k: (v.float() if v.dtype == torch.float16 else v) for k, v in state.items()}
        try:
            m.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise GGUFExportError(f"{self.qdir / 'model.safetensors'}: layer {name}: {err}") from None
        return m

    def heads(self, module: str) -> int | None:
        return qk_heads(self.arch, module, self.hp["head_count"], self.hp["head_count_kv"])


def _write(writer: gguf.GGUFWriter, path: Path) -> None:
    writer.write_header_to_file(path=path)
    fault_point("gguf:header")
    writer.write_kv_data_to_file()
    fault_point("gguf:metadata")
    writer.write_tensors_to_file()
    fault_point("gguf:tensors")
    writer.close()


# -- the base model -------------------------------------------------------------------------------------

def _quant_type(m: QuantLinear, name: str, ternary: QT, fallback: QT) -> tuple[QT, str | None]:
    """The GGUF type of a quantized layer and, for a fallback, why."""
    if name == "lm_head":
        return QT.F16, "output layer: kept in F16, as llama.cpp's converter does for TQ models"
    if m.kind == "ternary" and m.group_size % TQ_BLOCK == 0:
        return ternary, None
    if m.kind == "ternary":
        why = (f"ternary with group_size {m.group_size}: a {ternary.name} block holds {TQ_BLOCK} weights of a row "
               f"with one scale, so group_size must be a multiple of {TQ_BLOCK}")
        if m.in_features % TQ_BLOCK:
            why = f"row length {m.in_features} is not a multiple of the {ternary.name} block ({TQ_BLOCK})"
    else:
        why = (f"{m.bits}-bit asymmetric ((code - zero) * scale): no GGUF type that gguf-py can write "
               f"holds it (Q{m.bits}_K is read-only there)")
    if fallback == QT.Q4_0:
        if m.group_size % Q4_BLOCK == 0 and m.bits <= 4:
            return (QT.Q4_0 if m.kind == "ternary" else QT.Q4_1), why
        return QT.F16, why + f"; group_size {m.group_size} is not a multiple of the Q4 block ({Q4_BLOCK})"
    if fallback == QT.Q8_0 and m.in_features % 32:
        return QT.F16, why + f"; row length {m.in_features} is not a multiple of the Q8_0 block (32)"
    return fallback, why


def q4_blocks(m: QuantLinear, heads: int | None) -> np.ndarray:
    """Our codes as raw Q4_0 (ternary: d = scale, q = code - 1 + 8) or Q4_1 (d = scale, m = -scale x
    zero, q = code) blocks of 32, rows in llama.cpp's order: [rows, blocks x (18 | 20)] uint8."""
    out, inp = m.out_features, m.in_features
    per = m.group_size // Q4_BLOCK
    codes = _rows(m.codes().numpy().astype(np.uint8), heads).reshape(out, inp // Q4_BLOCK, Q4_BLOCK)
    scale = _rows(m.scale.detach().half().numpy(), heads).repeat(per, axis=1)  # per block of 32
    q = codes + 7 if m.kind == "ternary" else codes  # ternary code 0/1/2 is t = -1/0/1, q = t + 8
    qs = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)
    head = [scale[..., None].view(np.uint8)]
    if m.kind != "ternary":
        zero = _rows(m.zero.detach().half().numpy(), heads).repeat(per, axis=1)
        low = (-(scale.astype(np.float32) * zero.astype(np.float32))).astype(np.float16)
        head.append(low[..., None].view(np.uint8))
    return np.concatenate([*head, qs], axis=-1).reshape(out, -1)


def _dequantized(m: QuantLinear, device: torch.device | str) -> torch.Tensor:
    """The layer's float32 weight, computed on `device`, on the CPU."""
    if torch.device(device).type == "cpu":
        return m.dequantized_weight(torch.float32)
    q = m.quantized()
    return dequantize(q.to(device), scale=m.scale.detach().to(device),
                      zero=None if m.zero is None else m.zero.detach().to(device)).cpu()


def _rows(w: np.ndarray, heads: int | None) -> np.ndarray:
    return permute_rows(w, heads) if heads else w


def _encode(w: np.ndarray, qtype: QT) -> np.ndarray:
    """float32 / float16 arrays, or the raw uint8 blocks of a quantized type."""
    if qtype in (QT.F32, QT.F16):
        return w.astype(np.float32 if qtype == QT.F32 else np.float16)
    return gguf.quants.quantize(w, qtype)


def _encode_layer(layer: str, w: np.ndarray, qtype: QT, why: str | None,
                  blocks: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Encode a dequantized layer weight (or take its ready `blocks`); return the data and its max
    error read back. A TQ type (`why` None) must reproduce the ternary values exactly."""
    data = _encode(w, qtype) if blocks is None else blocks
    err = float(np.abs(gguf.quants.dequantize(data, qtype).reshape(w.shape) - w).max()) if w.size else 0.0
    if why is None and err != 0.0:
        raise GGUFExportError(f"{layer}: {qtype.name} does not reproduce the ternary weights exactly (max error "
                              f"{err:g}); expected float16 scales over groups of a multiple of {TQ_BLOCK} weights")
    return data, err


def _add_hparams(writer: gguf.GGUFWriter, src: _Source, warnings: list[str]) -> list[tuple[str, np.ndarray]]:
    """Model keys llama.cpp reads; returns extra tensors (rope_freqs for llama3 RoPE scaling)."""
    hp, extra = src.hp, []
    if hp["context_length"]:
        writer.add_context_length(hp["context_length"])
    writer.add_embedding_length(hp["embedding_length"])
    writer.add_block_count(hp["block_count"])
    writer.add_feed_forward_length(hp["feed_forward_length"])
    writer.add_head_count(hp["head_count"])
    writer.add_head_count_kv(hp["head_count_kv"])
    writer.add_rope_freq_base(float(hp["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(hp["rms_norm_eps"]))
    writer.add_vocab_size(hp["vocab_size"])
    if src.arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["embedding_length"] // hp["head_count"]:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    scaling = hp["rope_scaling"]
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))
        elif kind == "llama3" and src.arch == gguf.MODEL_ARCH.LLAMA:
            extra.append(("rope_freqs.weight", llama3_rope_factors(scaling, hp["rope_theta"], hp["head_dim"])))
        else:
            raise GGUFExportError(f"{src.qdir / 'config.json'}: RoPE scaling {kind!r} is not supported by this "
                                  "export (supported: linear, llama3 for llama)")
    window = src.config.get("sliding_window")
    if window and hp["context_length"] and window < hp["context_length"]:
        warnings.append(f"sliding_window {window} is ignored: llama.cpp's llama architecture attends to the "
                        "full context")
    return extra


def export_gguf(qdir: str | Path, out_path: str | Path, *, ternary_type: str = "TQ2_0", fallback: str = "Q4",
                tokenizer: bool = True, progress: Progress | None = None,
                device: torch.device | str = "cpu") -> dict[str, Any]:
    """Write the quantized base model of `qdir` (without adapters) as one GGUF file; return a report.

    `ternary_type`: TQ2_0 (2.0625 bits/weight) or TQ1_0 (1.6875). `fallback`: Q4 (exact Q4_0 / Q4_1
    blocks where our groups allow, else F16), F16 or Q8_0, for the quantized layers no TQ type can hold. `tokenizer=False` writes no vocabulary (tokenizer model
    "none"), for tokenizers that are not byte-level BPE. The report's ``bits_per_weight`` counts the
    bytes written for the quantized layers (fallbacks included) over their weights, the same
    population as `workbench.quant.model.size_report`. Each layer is dequantized on `device`
    (elementwise: the same values on every device); the encoding runs in numpy on the CPU."""
    if ternary_type not in TERNARY_TYPES:
        raise GGUFExportError(f"ternary_type must be one of {sorted(TERNARY_TYPES)}, got {ternary_type!r}")
    if fallback not in FALLBACK_TYPES:
        raise GGUFExportError(f"fallback must be one of {sorted(FALLBACK_TYPES)}, got {fallback!r}")
    ternary, fb = TERNARY_TYPES[ternary_type], FALLBACK_TYPES[fallback]
    src = _Source(qdir)
    name = arch_name(src.arch)
    writer = gguf.GGUFWriter(None, name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(src.qdir.name)
    writer.add_quantized_by("workbench")
    warnings: list[str] = []
    extra = _add_hparams(writer, src, warnings)
    tok_report = (add_tokenizer(writer, src.qdir, src.hp["vocab_size"], warnings) if tokenizer
                  else _no_tokenizer(writer))

    quant_modules = set(src.layers)
    float_names = [n for n in src.tensors if split_name(n)[0] not in quant_modules and not n.endswith("inv_freq")]
    items = [(m, "quant") for m in src.layers] + [(n, "float") for n in float_names]
    types: dict[str, int] = {}
    by_type: dict[str, dict[str, Any]] = {}
    fallbacks: list[dict[str, Any]] = []

    def add(gname: str, data: np.ndarray, qtype: QT) -> int:
        writer.add_tensor(gname, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        types[qtype.name] = types.get(qtype.name, 0) + 1
        return data.nbytes

    for gname, data in extra:
        add(gname, data, QT.F32)
    for i, (hf, what) in enumerate(items):
        module, leaf = (hf, "weight") if what == "quant" else split_name(hf)
        base = gguf_module(src.arch, module)
        if base is None:
            raise GGUFExportError(f"{src.qdir / 'model.safetensors'}: tensor {hf} has no llama.cpp name for "
                                  f"architecture {name!r}")
        gname, heads = f"{base}.{leaf}", src.heads(module)
        if what == "float":
            w = _rows(src.tensors[hf].float().numpy(), heads)
            qtype = QT.F32 if w.ndim == 1 else QT.F16
            add(gname, _encode(w, qtype), qtype)
        else:
            m = src.quant_linear(hf)
            qtype, why = _quant_type(m, hf, ternary, fb)
            w = _rows(_dequantized(m, device).numpy(), heads)
            blocks = q4_blocks(m, heads) if qtype in (QT.Q4_0, QT.Q4_1) else None
            data, err = _encode_layer(hf, w, qtype, why, blocks)
            if qtype == QT.Q4_0 and err != 0.0:
                raise GGUFExportError(f"{hf}: Q4_0 does not reproduce the ternary weights exactly (max error {err:g})")
            t = by_type.setdefault(qtype.name, {"tensors": 0, "weights": 0, "bytes": 0})
            t["tensors"] += 1
            t["weights"] += m.in_features * m.out_features
            t["bytes"] += add(gname, data, qtype)
            if why is not None:
                fallbacks.append({"tensor": gname, "layer": hf, "type": qtype.name, "reason": why,
                                  "exact": err == 0.0, "max_abs_error": err})
            if m.bias is not None:
                add(f"{base}.bias", _rows(m.bias.detach().float().numpy(), heads), QT.F32)
        if progress:
            progress(gname, i + 1, len(items))

    most = max(by_type, key=lambda k: by_type[k]["weights"]) if by_type else fb.name
    writer.add_file_type(FILE_TYPES[ternary if ternary.name in by_type else QT[most]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    with atomic_path(out_path) as tmp:
        _write(writer, tmp)
    for t in by_type.values():
        t["bits_per_weight"] = 8 * t["bytes"] / max(t["weights"], 1)
    weights = sum(t["weights"] for t in by_type.values())
    nbytes = sum(t["bytes"] for t in by_type.values())
    tied = "lm_head" not in src.layers and "lm_head.weight" not in src.tensors
    return {"path": str(out_path), "architecture": name, "ternary_type": ternary_type, "fallback": fallback,
            "tensor_count": sum(types.values()), "types": dict(sorted(types.items())),
            "file_bytes": os.path.getsize(out_path), "output_tied": tied, "quantized_layers": len(src.layers),
            "linear_weights": weights, "linear_bytes": nbytes, "bits_per_weight": 8 * nbytes / max(weights, 1),
            "by_type": by_type, "fallbacks": fallbacks, "tokenizer": tok_report, "warnings": warnings}


# -- the vocabulary ---------------------------------------------------------------------------------------

def _no_tokenizer(writer: gguf.GGUFWriter) -> dict[str, Any]:
    writer.add_tokenizer_model("none")
    return {"model": "none"}


def _byte_level(node: dict | None) -> bool:
    if not node:
        return False
    if node.get("type") == "ByteLevel":
        return True
    return any(_byte_level(p) for p in node.get("pretokenizers", []))


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: str | Path, n_vocab: int,
                  warnings: list[str] | None = None) -> dict[str, Any]:
    """Add the byte-level BPE ``tokenizer.json`` of `model_dir` as llama.cpp's "gpt2" vocabulary (tokens,
    token types, merges, pre-tokenizer), special token ids, add-BOS/EOS flags and chat template."""
    import tokenizers

    model_dir = Path(model_dir)
    warnings = [] if warnings is None else warnings
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{path}: missing; llama.cpp needs the vocabulary "
                              "(export with tokenizer=False to write a file without one)")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not _byte_level(data.get("pre_tokenizer")):
        kind = f"{model.get('type')} with pre-tokenizer {(data.get('pre_tokenizer') or {}).get('type')}"
        raise GGUFExportError(f"{path}: tokenizer is {kind}; this export writes byte-level BPE vocabularies "
                              "(llama.cpp 'gpt2') only (export with tokenizer=False to leave the vocabulary out)")
    vocab = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    if max([*vocab, *added], default=-1) >= n_vocab:
        raise GGUFExportError(f"{path}: token id {max([*vocab, *added])} is outside the model's vocab_size {n_vocab}")
    tokens, toktypes = [], []
    for i in range(n_vocab):
        if i in added:
            text = added[i]["content"]
            control = added[i].get("special") or (text.startswith("<|") and text.endswith("|>"))
            tokens.append(text)
            toktypes.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        elif i in vocab:
            tokens.append(vocab[i])
            toktypes.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
    tok = tokenizers.Tokenizer.from_file(str(path))
    digest = sha256(str(tok.encode(PRE_TOKENIZER_PROBE).ids).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(digest)
    if pre is None:
        pre = "default"
        warnings.append(f"{path}: unknown BPE pre-tokenizer (probe hash {digest[:12]}...); written as 'default', "
                        "so llama.cpp may split text differently from the HF tokenizer")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(toktypes)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    ids = special.special_token_ids
    # whether the HF tokenizer adds BOS / EOS, as measured (llama.cpp otherwise guesses per pre-tokenizer)
    with_special, plain = tok.encode("a").ids, tok.encode("a", add_special_tokens=False).ids
    special.add_special_token = {
        "bos": "bos" in ids and with_special[:1] == [ids["bos"]] and plain[:1] != [ids["bos"]],
        "eos": "eos" in ids and with_special[-1:] == [ids["eos"]] and plain[-1:] != [ids["eos"]]}
    special.add_to_gguf(writer, quiet=True)
    return {"model": "gpt2", "pre": pre, "tokens": len(tokens), "merges": len(special.merges),
            "special_ids": dict(ids), "add_bos": special.add_special_token["bos"],
            "add_eos": special.add_special_token["eos"], "chat_template": special.chat_template is not None}


# -- adapters ----------------------------------------------------------------------------------------------

def export_lora_gguf(qdir: str | Path, out_path: str | Path) -> dict[str, Any]:
    """Write the LoRA adapters of `qdir` as a llama.cpp LoRA GGUF (float32, exact) to apply on the base
    written by `export_gguf`: ``llama-cli -m base.gguf --lora adapters.gguf``."""
    src = _Source(qdir)
    lora = {n: e for n, e in src.layers.items() if e.get("lora_rank", 0) > 0}
    if not lora:
        raise GGUFExportError(f"{src.qdir / 'quant_config.json'}: no LoRA adapters (every layer has lora_rank 0); "
                              "nothing to export")
    alphas = {float(e["lora_alpha"]) for e in lora.values()}
    if len(alphas) > 1:
        raise GGUFExportError(f"{src.qdir / 'quant_config.json'}: layers use different lora_alpha {sorted(alphas)}; "
                              "a llama.cpp adapter has one adapter.lora.alpha")
    alpha = alphas.pop()
    name = arch_name(src.arch)
    writer = gguf.GGUFWriter(None, name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(f"{src.qdir.name} LoRA")
    params = 0
    for module in lora:
        base = gguf_module(src.arch, module)
        if base is None:
            raise GGUFExportError(f"{src.qdir / 'model.safetensors'}: adapter on {module} has no llama.cpp tensor "
                                  f"name for architecture {name!r}")
        a = src.tensors[f"{module}.lora_A"].float().numpy()  # [r, in]
        b = _rows(src.tensors[f"{module}.lora_B"].float().numpy(), src.heads(module))  # [out, r]
        writer.add_tensor(f"{base}.weight.lora_a", a)
        writer.add_tensor(f"{base}.weight.lora_b", b)
        params += a.size + b.size
    with atomic_path(out_path) as tmp:
        _write(writer, tmp)
    ranks = sorted({e["lora_rank"] for e in lora.values()})
    return {"path": str(out_path), "architecture": name, "tensor_count": 2 * len(lora), "layers": len(lora),
            "ranks": ranks, "alpha": alpha, "scaling": {r: alpha / r for r in ranks}, "params": params,
            "file_bytes": os.path.getsize(out_path)}


def export_gguf_with_lora(qdir: str | Path, out_path: str | Path, lora_path: str | Path, **options) -> dict[str, Any]:
    """`export_gguf` and `export_lora_gguf` of a model with adapters, committed together: both files are
    written under temporary names, then the adapter file is renamed into place and the model file
    last, so a kill at any point never leaves a model .gguf without its adapter file (which would
    look finished, and block a rerun without --overwrite). `options` go to `export_gguf`."""
    out_path, lora_path = Path(out_path), Path(lora_path)
    with atomic_paths(lora_path, out_path) as (lora_tmp, model_tmp):   # the model file renamed last
        report = export_gguf(qdir, model_tmp, **options)
        report["lora"] = export_lora_gguf(qdir, lora_tmp)
    report["path"] = str(out_path)
    report["lora"]["path"] = str(lora_path)
    return report


# -- reading back ------------------------------------------------------------------------------------------

def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every key-value pair of a GGUF file (arrays as lists)."""
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def read_gguf_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, dequantized to float32, in numpy (row-major, [out, in]) shape."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            for t in reader.tensors}


def gguf_weights_as_hf(path: str | Path, heads: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """`read_gguf_weights` under our HF names, with the llama Q/K row permutation undone.

    Base tensors come back as ``<module>.weight`` / ``.bias``; adapter tensors as ``<module>.lora_A`` /
    ``.lora_B``. `heads` (n_head, n_head_kv) is needed for llama adapter files, which do not carry them."""
    meta = read_gguf_metadata(path)
    arch_str = meta["general.architecture"]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_str)
    if heads is None and f"{arch_str}.attention.head_count" in meta:
        n_head = int(meta[f"{arch_str}.attention.head_count"])
        heads = (n_head, int(meta.get(f"{arch_str}.attention.head_count_kv", n_head)))
    out = {}
    for gname, w in read_gguf_weights(path).items():
        lora = gname.endswith((".lora_a", ".lora_b"))
        stem = gname.rsplit(".", 1)[0] if lora else gname
        base, leaf = stem.rsplit(".", 1)
        module = hf_module(base)
        if module is None:
            out[gname] = w  # e.g. rope_freqs.weight
            continue
        n = None
        if arch == gguf.MODEL_ARCH.LLAMA and module.endswith(("q_proj", "k_proj")) and not gname.endswith(".lora_a"):
            if heads is None:
                raise GGUFExportError(f"{path}: {gname}: head counts needed to undo the Q/K permutation; pass heads")
            n = heads[0] if module.endswith("q_proj") else heads[1]
        w = unpermute_rows(w, n) if n else w
        out[f"{module}.{'lora_A' if gname.endswith('.lora_a') else 'lora_B'}" if lora else f"{module}.{leaf}"] = w
    return out
