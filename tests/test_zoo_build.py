"""`workbench zoo build` / `zoo status` end to end on a tiny base model in a temporary home."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import save_tiny_model
from workbench.ops.zoo import build
from workbench.zoo import build as B
from workbench.zoo.train import TrainConfig


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    base = save_tiny_model(tmp_path / "home" / "models" / "SmolLM2-135M-Instruct", "llama", seed=0)
    cfg = dict(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=2, chat_template=False)
    experts = {
        "zoo-expert-arith": B.ExpertSpec("zoo-expert-arith", "arith", "tiny arith", TrainConfig(seed=1, **cfg), 11),
        "zoo-expert-french": B.ExpertSpec("zoo-expert-french", "french", "tiny french",
                                          TrainConfig(seed=2, trainable=("mlp.",), layers=(2, 4), **cfg), 12),
    }
    monkeypatch.setattr(B, "EXPERTS", experts)
    monkeypatch.setattr(B, "pick_threads", lambda requested=None: 1)
    return base


def test_build_is_resumable_idempotent_and_records_training(tiny_zoo):
    from safetensors.torch import load_file

    assert build(stop_after=3) == []  # interrupted after 3 of 6 steps
    states = {r["name"]: r["state"] for r in B.zoo_status()}
    assert states["zoo-expert-arith"].startswith("partial (3/6") and states["zoo-expert-french"].startswith("partial")

    paths = build()
    assert [p.name for p in paths] == ["zoo-expert-arith", "zoo-expert-french"]
    rec = json.loads((paths[0] / "train.json").read_text())
    assert rec["resumed_from_step"] == 3 and rec["steps"] == 6 and len(rec["loss_curve"]) == 6
    assert rec["seeds"] == {"train": 1, "data_order": 11, "partition": 1234}
    assert rec["data"]["examples_seen"] == 24 and rec["hyperparameters"]["lr"] == 1e-3
    assert not B.work_dir("zoo-expert-arith").exists()  # the checkpoint is gone once the expert is saved

    base = load_file(str(tiny_zoo / "model.safetensors"))
    for path in paths:
        w = load_file(str(path / "model.safetensors"))
        assert set(w) == set(base) and all(t.dtype == torch.float32 for t in w.values())
        assert (path / "tokenizer.json").is_file() and (path / "config.json").is_file()
    french = load_file(str(paths[1] / "model.safetensors"))
    changed = {n for n in base if not torch.equal(base[n], french[n])}
    assert changed and all(".mlp." in n and (".2." in n or ".3." in n) for n in changed)

    stamp = (paths[0] / "model.safetensors").stat().st_mtime_ns
    assert build() == paths  # nothing left to do
    assert (paths[0] / "model.safetensors").stat().st_mtime_ns == stamp
    assert {r["state"] for r in B.zoo_status()} == {"built"}


def test_resumed_build_equals_uninterrupted_build(tiny_zoo, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    build(only=["zoo-expert-arith"], stop_after=4)
    resumed = load_file(str(build(only=["zoo-expert-arith"])[0] / "model.safetensors"))
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home2"))
    save_tiny_model(tmp_path / "home2" / "models" / "SmolLM2-135M-Instruct", "llama", seed=0)
    straight = load_file(str(build(only=["zoo-expert-arith"])[0] / "model.safetensors"))
    assert all(torch.equal(resumed[n], straight[n]) for n in straight)


def test_cli_status_and_unknown_expert(tiny_zoo, capsys):
    from workbench.cli import main

    assert main(["zoo", "status", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["SmolLM2-135M-Instruct", "zoo-expert-arith", "zoo-expert-french"]
    assert [r["state"] for r in rows] == ["built", "missing", "missing"]
    assert main(["zoo", "build", "--only", "zoo-expert-latin", "--no-progress"]) == 2
