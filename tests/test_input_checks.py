"""Check before work: broken weight files are refused when a model is opened, and a NaN/inf weight
stops a merge, each as one line naming the file or model, the tensor and the bytes or count."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch

from workbench.cli import main
from workbench.merge.methods import METHODS, MergeParams
from workbench.models.checkpoint import ModelDir, ModelLoadError, check_weight_files
from workbench.models.gguf_import import GGUFImportError, check_gguf_file
from workbench.models.safetensors_io import read_header

TENSOR = "model.layers.1.mlp.up_proj.weight"


def cli(capsys, *argv: str) -> tuple[int, str]:
    """``workbench ARGV``: its exit status and its stderr, which on an error is one line."""
    capsys.readouterr()   # drop what fixtures printed
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    if rc:
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return rc, err


def write_raw(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file from a header (dict, or raw bytes) and data bytes, as they are given."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def merge_recipe(tmp_path: Path, base: Path, *others: Path) -> Path:
    models = ", ".join(f"{{model: {o}, parameters: {{weight: 0.5}}}}" for o in others)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{models}]\n")
    return recipe


def put_value(model: Path, name: str, value: float, index: int = 7) -> None:
    """Overwrite one float32 entry of tensor ``name`` in ``model/model.safetensors``, in place."""
    f = model / "model.safetensors"
    header, start = read_header(f)
    assert header[name]["dtype"] == "F32"
    with open(f, "r+b") as fh:
        fh.seek(start + header[name]["data_offsets"][0] + 4 * index)
        fh.write(struct.pack("<f", value))


# ---- safetensors files, checked when opened --------------------------------------------------


def test_truncated_file_fails_at_open_naming_file_tensor_and_bytes(tiny_models, tmp_path, capsys):
    base, a = tiny_models("llama", 2)
    f = a / "model.safetensors"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(ModelLoadError) as e:
        ModelDir(a)
    msg = str(e.value)
    assert str(f) in msg and f"has {size // 2} bytes" in msg and f"needs {size}" in msg and "cut short" in msg
    first_cut = msg.split("tensor ")[1].split()[0].strip("'")
    assert first_cut in ModelDir(base).tensor_names()
    with pytest.raises(ModelLoadError, match="cut short"):
        check_weight_files(a)

    out = tmp_path / "merged"
    rc, err = cli(capsys, "merge", str(merge_recipe(tmp_path, base, a)), str(out), "--no-progress")
    assert rc == 2
    assert "model.safetensors" in err and first_cut in err and f"has {size // 2} bytes" in err
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    rc, err = cli(capsys, "recipe", "validate", str(tmp_path / "r.yml"))
    assert rc == 2 and "cut short" in err


def test_header_not_json_and_header_longer_than_file(tiny_models, tmp_path, capsys):
    base, a = tiny_models("llama", 2)
    f = a / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:8] + b"\x00not json" + data[17:])   # same length, garbled header
    rc, err = cli(capsys, "merge", str(merge_recipe(tmp_path, base, a)), str(tmp_path / "m1"), "--no-progress")
    assert rc == 2
    assert str(f) in err and "not JSON" in err

    write_raw(f, b"{}", length=10_000)   # says 10000 header bytes; the file has 10
    rc, err = cli(capsys, "merge", str(tmp_path / "r.yml"), str(tmp_path / "m2"), "--no-progress")
    assert rc == 2
    assert str(f) in err and "10000 bytes long" in err and "only 10 bytes" in err
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()


@pytest.mark.parametrize("case, header, data, match", [
    ("offsets vs shape", {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, bytes(24),
     r"tensor 'w' has data_offsets \[0, 20\] \(20 bytes\), but its shape \[2, 3\] of F32 takes 24 bytes"),
    ("overlap", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                 "b": {"dtype": "F16", "shape": [4], "data_offsets": [8, 16]}}, bytes(16),
     r"tensors 'a' \(data bytes 0..16\) and 'b' \(data bytes 8..16\) overlap"),
    ("unknown dtype", {"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 2]}}, bytes(2),
     "tensor 'w' has unknown dtype 'Q4'"),
    ("past the end", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(12),
     r"cut short .*tensor 'b' needs bytes"),
    ("malformed", {"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, bytes(16),
     "tensor 'w': malformed header entry"),
])
def test_bad_headers_are_one_line_errors(tmp_path, case, header, data, match):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    f = write_raw(model / "model.safetensors", header, data)
    for check in (ModelDir, check_weight_files):
        with pytest.raises(ModelLoadError, match=match) as e:
            check(model)
        assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_readable_but_unsupported_dtype_is_refused_by_the_merge_reader_only(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    write_raw(model / "model.safetensors", {"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, bytes(4))
    check_weight_files(model)   # a valid file: transformers may read it
    with pytest.raises(ModelLoadError, match="dtype F8_E4M3, which workbench does not read"):
        ModelDir(model)


def test_every_shard_is_checked_when_the_model_is_opened(tiny_models, tmp_path):
    from conftest import save_tiny_model

    sharded = save_tiny_model(tmp_path / "sharded", "llama", max_shard_size="20KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    with open(shards[-1], "r+b") as fh:
        fh.truncate(shards[-1].stat().st_size - 1)
    with pytest.raises(ModelLoadError, match=f"{shards[-1].name}: cut short"):
        ModelDir(sharded)
    with pytest.raises(ModelLoadError, match="cut short"):
        check_weight_files(sharded)


# ---- GGUF ------------------------------------------------------------------------------------


def write_gguf(path: Path) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    for name, rows in (("token_embd.weight", 64), ("blk.0.ffn_up.weight", 48), ("output.weight", 64)):
        w.add_tensor(name, np.ones((rows, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_cut_in_half_names_the_tensor_and_bytes(tmp_path, capsys):
    whole = write_gguf(tmp_path / "m.gguf")
    assert check_gguf_file(whole) == whole
    check_weight_files(whole)
    size = whole.stat().st_size
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: size // 2])
    with pytest.raises(GGUFImportError) as e:
        check_gguf_file(cut)
    msg = str(e.value)
    assert str(cut) in msg and f"has {size // 2} bytes" in msg and f"need {size}" in msg
    assert "tensor 'blk.0.ffn_up.weight' needs bytes" in msg and "and 1 more" in msg
    with pytest.raises(ModelLoadError, match="blk.0.ffn_up.weight"):
        check_weight_files(cut)
    rc, err = cli(capsys, "models", "import-gguf", str(cut), str(tmp_path / "out"))
    assert rc == 2 and "blk.0.ffn_up.weight" in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "stub.gguf").write_bytes(whole.read_bytes()[:40])   # cut inside the metadata
    with pytest.raises(GGUFImportError, match="unreadable GGUF metadata"):
        check_gguf_file(tmp_path / "stub.gguf")


# ---- non-finite weights ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weight_stops_the_merge_unless_allowed(tiny_models, tmp_path, capsys, value):
    base, a, b = tiny_models("llama", 3)
    put_value(b, TENSOR, value)
    recipe = merge_recipe(tmp_path, base, a, b)
    out = tmp_path / "merged"
    rc, err = cli(capsys, "merge", str(recipe), str(out), "--no-progress")
    assert rc == 2
    assert f"model '{b}': tensor '{TENSOR}' holds 1 non-finite values (NaN/inf)" in err
    assert "--allow-nonfinite" in err
    assert not out.exists() and not list(tmp_path.glob(".merged*"))

    assert cli(capsys, "merge", str(recipe), str(out), "--no-progress", "--allow-nonfinite")[0] == 0
    merged = ModelDir(out).get_tensor(TENSOR)
    assert not torch.isfinite(merged).all() and torch.isfinite(ModelDir(out).get_tensor("lm_head.weight")).all()


def required_params(name: str, weight: float, t: float) -> tuple[dict, dict]:
    """Shared and per-model values for the required parameters, sparsifying methods keeping little."""
    shared, per_model = {}, {}
    for pname, spec in METHODS[name].params.items():
        value = {"weight": weight, "t": t, "density": 0.2}.get(pname, spec.default)
        if value is None:
            value = spec.kind(spec.low if spec.low is not None else 1)
        (per_model if spec.per_model else shared)[pname] = value
    return shared, per_model


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_method_carries_a_non_finite_input_into_its_result(name, value):
    """The executor checks merged results only (one pass, not one per input): this holds every
    method to carrying a NaN/inf of any input into its result, wherever it sits, whatever the
    weights, and whether or not trimming (TIES, DARE, breadcrumbs, DELLA) drops that entry."""
    method = METHODS[name]
    n = max(method.min_models, min(2, method.max_models or 2))
    g = torch.Generator().manual_seed(0)
    for weight, t in ((0.5, 0.5), (0.0, 0.0), (1.0, 1.0)):
        shared, per_model = required_params(name, weight, t)
        for who in range(n + (method.base != "none")):
            for index in (0, 5, 200):   # entries with small and large magnitudes
                base = torch.randn(16, 24, generator=g) if method.base != "none" else None
                others = [(base if base is not None else 0) + torch.randn(16, 24, generator=g) * 0.1
                          for _ in range(n)]
                inputs = ([base] if base is not None else []) + others
                inputs[who].view(-1)[index] = value
                models = [dict(per_model, **({"weight": 1.0} if i and "weight" in per_model else {}))
                          for i in range(n)]   # the first model weighs `weight`, others 1
                params = MergeParams(dict(shared), models, torch.Generator().manual_seed(1))
                out = method.fn(base, others, params)
                assert not torch.isfinite(out).all(), (name, weight, t, who, index)


LOADER_CHECKS = "check_weight_files" in Path(__file__).parents[1].joinpath("workbench/models/loader.py").read_text()


@pytest.mark.skipif(not LOADER_CHECKS, reason="loader.resolve_model does not call check_weight_files yet")
def test_quantize_of_a_cut_short_model_is_one_line(tiny_models, tmp_path, capsys):
    (base,) = tiny_models("llama", 1)
    f = base / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    config = tmp_path / "q.yml"
    shutil.copy(Path(__file__).parents[1] / "recipes" / "2bit.yml", config)
    rc, err = cli(capsys, "quantize", str(base), "--config", str(config), "--out", str(tmp_path / "q"),
                  "--no-eval", "--no-progress")
    assert rc == 2
    assert str(f) in err and "cut short" in err
