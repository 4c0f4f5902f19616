"""Quantizing whole models: save/load, recovery (KL to the teacher goes down, exact resume), exports."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, save_tiny_model, write_quant_inputs
from transformers import AutoModelForCausalLM

from workbench.quant.config import QuantConfigError, quant_config_from_dict
from workbench.quant.linear import QuantLinear
from workbench.quant.model import load_quantized, quant_layers, quantize_model, save_quantized, size_report
from workbench.quant.options import RecoverOptions
from workbench.quant.recover import Recovery, kl_on_windows, teacher_topk


@pytest.fixture(autouse=True)
def _pure_torch(monkeypatch):
    monkeypatch.setenv("WORKBENCH_KERNELS", "0")  # the kernels have their own tests


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _ids(n=2, t=12, seed=0):
    return torch.randint(3, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("cfg", [{"bits": 1.58, "group_size": 16, "storage": "trits", "lora": {"rank": 4}},
                                 {"bits": 2, "group_size": 8, "lora": {"rank": 2}},
                                 {"bits": 4, "group_size": 32, "method": "rtn"},
                                 {"bits": 2, "group_size": 16, "embeddings": "bfloat16", "lora": {"rank": 2}}])
def test_quantized_model_saves_and_reloads_with_identical_logits(tmp_path, arch, cfg):
    src = save_tiny_model(tmp_path / "src", arch)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    config = quant_config_from_dict(cfg)
    quantize_model(model, config)
    layers = quant_layers(model)
    assert layers and all(isinstance(m, QuantLinear) for m in layers.values())
    if arch != "gpt2":  # every Linear but lm_head became a QuantLinear
        assert len(layers) == n_linear - 1
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert emb.weight.dtype == (torch.bfloat16 if cfg.get("embeddings") == "bfloat16" else torch.float32)
    assert (head.weight is emb.weight) == bool(model.config.tie_word_embeddings)
    ids = _ids()
    before = _logits(model, ids)
    save_quantized(model, tmp_path / "q", src, config)
    reloaded = load_quantized(tmp_path / "q")
    assert torch.equal(_logits(reloaded, ids), before)
    meta = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert meta["config"]["bits"] == cfg["bits"]
    report = size_report(reloaded, config.storage)
    assert report["quantized_layers"] == len(layers)
    assert report["bits_per_weight"] > 0 and report["adapter_params"] == sum(
        m.lora_rank * (m.in_features + m.out_features) for m in layers.values())


def test_trits_storage_is_smaller_than_packed(tmp_path):
    src = save_tiny_model(tmp_path / "src", "llama")
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    quantize_model(model, quant_config_from_dict({"bits": 1.58, "group_size": 32}))
    packed, trits = size_report(model, "packed"), size_report(model, "trits")
    assert trits["linear_bytes"] < packed["linear_bytes"]


def test_bad_group_size_is_refused_before_any_weight_changes(tmp_path):
    src = save_tiny_model(tmp_path / "src", "llama")
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    with pytest.raises(QuantConfigError, match=r"group_size 48 does not divide the row length 64 of .*mlp.down_proj.weight \[32, 64\]"):
        quantize_model(model, quant_config_from_dict({"bits": 2, "group_size": 48}))
    assert not quant_layers(model)


def _recovery_setup(tmp_path, seed=0):
    src = save_tiny_model(tmp_path / "src", "llama", seed=seed)
    teacher = AutoModelForCausalLM.from_pretrained(src).eval()
    student = AutoModelForCausalLM.from_pretrained(src).eval()
    quantize_model(student, quant_config_from_dict({"bits": 2, "group_size": 16, "lora": {"rank": 4}}))
    windows = _ids(16, 32, seed=1)
    return src, teacher, student, windows


def test_recovery_lowers_the_kl_to_the_teacher(tmp_path):
    src, teacher, student, windows = _recovery_setup(tmp_path)
    held_out = _ids(8, 32, seed=2)
    cache = teacher_topk(teacher, held_out, k=16, batch_size=4)
    before = kl_on_windows(student, held_out, cache)
    opts = RecoverOptions(steps=40, block_steps=20, seq_len=32, batch_size=4, top_k=16, lr=3e-3, block_lr=3e-3,
                          dtype="float32", max_tokens=512, block_tokens=256)
    Recovery(student, windows, opts, tmp_path / "work", lambda: teacher).run()
    after = kl_on_windows(student, held_out, cache)
    assert after < 0.7 * before, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "work" / "loss.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in rows} == {"blocks", "e2e"}


def test_recovery_resumes_to_the_same_adapters(tmp_path):
    opts = dict(steps=12, block_steps=6, seq_len=32, batch_size=4, top_k=8, dtype="float32", checkpoint_every=4,
                max_tokens=512, block_tokens=256)
    _, teacher, whole, windows = _recovery_setup(tmp_path / "a")
    Recovery(whole, windows, RecoverOptions(**opts), tmp_path / "a" / "work", lambda: teacher).run()

    class Killed(Exception):
        pass

    def kill_at_step_9(phase, done, total, loss):
        if phase == "e2e" and done == 9:  # after the step-8 checkpoint, before the next one
            raise Killed

    _, teacher, part, windows = _recovery_setup(tmp_path / "b")
    with pytest.raises(Killed):
        Recovery(part, windows, RecoverOptions(**opts), tmp_path / "b" / "work", lambda: teacher,
                 kill_at_step_9).run()
    _, teacher, resumed, windows = _recovery_setup(tmp_path / "c")
    Recovery(resumed, windows, RecoverOptions(**opts), tmp_path / "b" / "work", lambda: teacher).run()
    rows = [json.loads(line) for line in (tmp_path / "b" / "work" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "e2e"] == list(range(12))  # each step logged once
    for (name, a), (_, b) in zip(sorted(whole.named_parameters()), sorted(resumed.named_parameters())):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("embeddings", ["float32", "bfloat16"])
def test_hf_export_merges_adapters_and_reloads(tmp_path, embeddings):
    from workbench.export.hf import export_hf
    from workbench.quant.embeddings import cast_embeddings

    src, _, student, _ = _recovery_setup(tmp_path)
    cast_embeddings(student, embeddings)
    for m in quant_layers(student).values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    save_quantized(student, tmp_path / "q", src)
    model = load_quantized(tmp_path / "q")
    export_hf(model, tmp_path / "q", tmp_path / "hf")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    ids = _ids()
    # The bfloat16 head rounds its input to bfloat16; the export multiplies the same weights in float32.
    atol = 1e-4 if embeddings == "float32" else 5e-3
    assert torch.allclose(_logits(plain, ids), _logits(model, ids), atol=atol)
    assert plain.get_input_embeddings().weight.dtype == torch.float32


MIXED_RANKS = [{"pattern": "mlp", "rank": 2}, {"pattern": r"q_proj|c_attn", "rank": 0}, {"pattern": "k_proj", "rank": 6}]


@pytest.mark.parametrize("arch,layers", [("llama", []), ("gpt2", []), ("llama", MIXED_RANKS), ("gpt2", MIXED_RANKS)])
def test_peft_export_loads_with_peft_and_matches(tmp_path, arch, layers):
    """One rank, or per-layer ranks as a searched config has them (peft's rank_pattern)."""
    peft = pytest.importorskip("peft")
    from workbench.export.peft import export_peft

    src = save_tiny_model(tmp_path / "src", arch)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    quantize_model(model, quant_config_from_dict({"bits": 1.58, "group_size": 16, "lora": {"rank": 4, "alpha": 8},
                                                  "layers": layers}))
    if layers:
        assert len({m.lora_rank for m in quant_layers(model).values()}) == (3 if arch == "gpt2" else 4)
    for m in quant_layers(model).values():
        if m.lora_rank:
            torch.nn.init.normal_(m.lora_B, std=0.05)
    save_quantized(model, tmp_path / "q", src)
    model = load_quantized(tmp_path / "q")
    export_peft(model, tmp_path / "q", tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base").eval()
    ids = _ids()
    base_logits = _logits(base, ids)
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    out = _logits(with_adapter, ids)
    assert torch.allclose(out, _logits(model, ids), atol=1e-4)
    assert not torch.allclose(out, base_logits, atol=1e-3)  # the adapter does something


def test_cli_quantize_recover_export(tmp_path, capsys):
    from workbench.cli import main

    src = save_tiny_model(tmp_path / "src", "llama")
    cfg, task_file, corpus = write_quant_inputs(tmp_path)
    task = ["--eval-task", str(task_file)]
    assert main(["quantize", str(src), "--config", str(cfg), "--out", str(tmp_path / "q"), "--no-progress",
                 "--json", str(tmp_path / "q.json"), *task]) == 0
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["quantized_layers"] == 28 and report["ppl"] > 0
    assert main(["recover", str(tmp_path / "q"), "--teacher", str(src), "--corpus", str(corpus), "--out",
                 str(tmp_path / "r"), "--steps", "4", "--block-steps", "2", "--seq-len", "32", "--max-tokens", "512",
                 "--block-tokens", "256", "--top-k", "8", "--no-progress", "--json", str(tmp_path / "r.json"), *task]) == 0
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["steps"] == 4 and rec["ppl_after"] > 0
    assert not (tmp_path / "r.work").exists()
    assert (tmp_path / "r" / "loss.jsonl").is_file()
    for fmt in ("safetensors", "peft", "hf"):
        assert main(["export", str(tmp_path / "r"), "--format", fmt, "--out", str(tmp_path / f"e-{fmt}")]) == 0
    assert main(["recover", str(tmp_path / "q"), "--teacher", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "--teacher" in capsys.readouterr().err


def test_teacher_cache_under_a_deadline_risks_one_window_first(tmp_path):
    """With a deadline, the first teacher batch is one window; a batch whose measured time per window
    does not fit what is left is not started. Without one, whole batches give the same top-k."""
    _, teacher, _, windows = _recovery_setup(tmp_path)
    sizes = []

    class Counting(torch.nn.Module):
        def forward(self, ids, **kw):
            sizes.append(len(ids))
            return teacher(ids, **kw)

    ref = teacher_topk(teacher, windows[:8], k=8, batch_size=4)
    full = teacher_topk(Counting(), windows[:8], k=8, batch_size=4, time_left=lambda: 1e9)
    assert sizes == [1, 4, 3]
    torch.testing.assert_close(full["logprobs"], ref["logprobs"], atol=1e-5, rtol=0)
    assert torch.equal(full["indices"][:, :, 0], ref["indices"][:, :, 0])
    sizes.clear()
    clock = iter([1e9] + [0.0] * 10)  # time enough for the probe, none after it
    part = teacher_topk(Counting(), windows[:8], k=8, batch_size=4, time_left=lambda: next(clock))
    assert sizes == [1] and len(part["tail"]) == 1
