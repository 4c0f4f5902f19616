"""Nothing a user has is destroyed or misreported: occupied outputs are refused without --overwrite,
every command loads a model as what it is (never with weights left at random), outputs get the
umask's permissions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import VOCAB, save_tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from workbench.atomic import OutputExistsError, atomic_dir, check_output, occupied
from workbench.cli import main
from workbench.models.checkpoint import ModelLoadError
from workbench.models.loader import load_model, model_kind, resolve_model
from workbench.quant.config import quant_config_from_dict
from workbench.quant.model import quantize_model, save_quantized


@pytest.fixture(autouse=True)
def _pure_torch(monkeypatch):
    monkeypatch.setenv("WORKBENCH_KERNELS", "0")


def _ids(seed=0):
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))


def _quantized(tmp_path: Path, arch: str = "llama") -> tuple[Path, Path]:
    src = save_tiny_model(tmp_path / f"src-{arch}", arch)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    cfg = quant_config_from_dict({"bits": 2, "group_size": 8, "lora": {"rank": 2}})
    quantize_model(model, cfg)
    return src, save_quantized(model, tmp_path / f"q-{arch}", src, cfg)


# --- outputs ----------------------------------------------------------------------------------

def test_occupied_outputs_are_refused_and_empty_ones_are_not(tmp_path):
    empty, full, f = tmp_path / "empty", tmp_path / "full", tmp_path / "file.txt"
    empty.mkdir()
    full.mkdir()
    (full / "mine.txt").write_text("keep me")
    f.write_text("x")
    assert not occupied(tmp_path / "missing") and not occupied(empty)
    assert occupied(full) and occupied(f)
    check_output(empty)
    check_output(tmp_path / "missing")
    for p in (full, f):
        with pytest.raises(OutputExistsError, match=f"{p.name}: the output .* already exists.*--overwrite"):
            check_output(p)
        check_output(p, overwrite=True)
    with pytest.raises(OutputExistsError):
        with atomic_dir(full) as tmp:
            (tmp / "x").write_text("new")
    assert (full / "mine.txt").read_text() == "keep me" and not (full / "x").exists()
    with atomic_dir(empty) as tmp:   # an empty directory is used as the output
        (tmp / "x").write_text("new")
    assert (empty / "x").read_text() == "new"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_directories_and_files_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("a")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "out" / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_eval_refuses_an_existing_json_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import workbench.models.loader as loader

    src = save_tiny_model(tmp_path / "m", "llama")
    out = tmp_path / "results.json"
    out.write_text("my earlier results\n")
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["eval", str(src), "zoo-perplexity", "--limit", "1", "--json", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "results.json" in err and "--overwrite" in err and "Traceback" not in err
    assert out.read_text() == "my earlier results\n"


def test_import_gguf_refuses_an_occupied_directory(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    gguf = tmp_path / "m.gguf"
    _write_tiny_gguf(gguf)
    assert main(["models", "import-gguf", str(gguf), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.md"]


def _write_tiny_gguf(path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --- one loader -----------------------------------------------------------------------------

def test_loader_resolves_paths_and_home_names_by_one_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    named = save_tiny_model(tmp_path / "home" / "models" / "tiny", "llama")
    assert resolve_model("tiny") == named
    assert resolve_model(named) == named
    with pytest.raises(ModelLoadError, match="no-such: no such model"):
        resolve_model("no-such")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin.*never read"):
        resolve_model(tmp_path / "pickled")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_float_directory_missing_weights_is_refused_naming_them(tmp_path, arch):
    src = save_tiny_model(tmp_path / "m", arch)
    tensors = load_file(src / "model.safetensors")
    dropped = sorted(n for n in tensors if "layers.1.mlp" in n)
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=f"{len(dropped)} tensors missing.*layers.1.mlp"):
        load_model(src)


def test_tied_head_is_not_a_missing_weight(tmp_path):
    src = save_tiny_model(tmp_path / "m", "qwen2")   # tie_word_embeddings: lm_head is not stored
    assert "lm_head.weight" not in load_file(src / "model.safetensors")
    model, _ = load_model(src)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compressed_directory_loads_as_what_it_is(tmp_path, arch):
    """Before: transformers loaded it with every linear weight missing and random (ppl 2.5e18)."""
    from workbench.quant.model import load_quantized
    from workbench.ops.quant import export as export_quantized

    _, q = _quantized(tmp_path, arch)
    assert model_kind(q) == "quantized"
    model, tok = load_model(q)
    ids = _ids()
    with torch.no_grad():
        ours = model(ids).logits
        assert torch.equal(ours, load_quantized(q)(ids).logits)
    hf = tmp_path / "hf"
    export_quantized(q, hf, "hf")
    assert model_kind(hf) == "float"
    exported, _ = load_model(hf)
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, ours, atol=2e-4, rtol=1e-4)


def test_eval_of_a_compressed_directory_equals_eval_of_its_hf_export(tmp_path, capsys):
    from workbench.ops.quant import export as export_quantized

    _, q = _quantized(tmp_path, "llama")
    hf = tmp_path / "hf"
    export_quantized(q, hf, "hf")
    task = tmp_path / "t.yml"
    items = [{"text": " ".join(f"w{(7 * i + j) % (VOCAB - 3) + 3}" for j in range(40)), "split": "search"}
             for i in range(3)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    task.write_text(yaml.safe_dump({"name": "t", "type": "perplexity", "items": "t.jsonl", "max_length": 32}))
    scores = {}
    for name, model in (("q", q), ("hf", hf)):
        out = tmp_path / f"{name}.json"
        assert main(["eval", str(model), str(task), "--json", str(out), "--no-progress"]) == 0
        scores[name] = json.loads(out.read_text())["t"]
    assert scores["q"]["ppl"] < 1e4   # a model with random linear weights would be far off, not this
    assert scores["q"]["ppl"] == pytest.approx(scores["hf"]["ppl"], rel=1e-4)


def test_a_compressed_directory_is_refused_as_a_merge_source(tmp_path, capsys):
    src, q = _quantized(tmp_path, "llama")
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(src), "parameters": {"weight": 0.5}}, {"model": str(q), "parameters": {"weight": 0.5}}]}))
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "compressed (quantized) model" in err and "--format hf" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
