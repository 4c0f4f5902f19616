"""`workbench quantize` / `recover` / `export` never destroy or misreport what a user has: occupied
outputs are refused before any work without --overwrite, reported perplexities are those of the saved
directory, the time budget bounds the whole recover run (each phase within its share), reports go
to stdout."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import VOCAB, save_tiny_model, write_quant_inputs
from transformers import AutoModelForCausalLM

from workbench.atomic import OutputExistsError
from workbench.cli import main
from workbench.quant.config import quant_config_from_dict
from workbench.quant.model import load_quantized, quantize_model, save_quantized
from workbench.quant.options import RecoverOptions
from workbench.eval.evaluator import heldout_perplexity
from workbench.ops.quant import quantize as quantize_to_dir
from workbench.ops.quant import recover as recover_to_dir
from workbench.models.anatomy import decoder_blocks
from workbench.quant.recover import Recovery

TOL = 1.0  # seconds: a phase may end past its share by about one step or batch (on a busy 2-core CPU)


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_KERNELS", "0")
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))


@pytest.fixture
def one_thread():
    """Steadier step times for the timing tests on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def files(tmp_path):
    """A tiny float model, a 2-bit LoRA config, a held-out perplexity task and a calibration text."""
    src = save_tiny_model(tmp_path / "src", "llama")
    cfg, task, corpus = write_quant_inputs(tmp_path)
    return {"src": src, "cfg": cfg, "task": str(task), "corpus": str(corpus)}


def _quantized(tmp_path, src):
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    cfg = quant_config_from_dict({"bits": 2, "group_size": 16, "lora": {"rank": 2}})
    quantize_model(model, cfg)
    return save_quantized(model, tmp_path / "q", src, cfg)


def _mine(path):
    path.mkdir()
    (path / "mine.txt").write_text("keep me")
    return path / "mine.txt"


# --- outputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["safetensors", "peft", "hf"])
def test_export_keeps_a_users_directory_without_overwrite(tmp_path, files, fmt, capsys):
    q = _quantized(tmp_path, files["src"])
    out = tmp_path / "out"
    mine = _mine(out)
    assert main(["export", str(q), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert mine.read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert "out" in err and "--overwrite" in err
    assert main(["export", str(q), "--format", fmt, "--out", str(out), "--overwrite"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["format"] == fmt  # the report alone on stdout, for pipes
    assert not mine.exists() and "exporting" in captured.err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(q), "--format", fmt, "--out", str(empty)]) == 0  # an empty directory is fine
    assert json.loads(capsys.readouterr().out)["path"] == str(empty)


def test_gguf_export_keeps_the_users_gguf_and_lora_companion(tmp_path, files):
    from workbench.ops.quant import export as export_quantized

    q = _quantized(tmp_path, files["src"])
    for name in ("model.gguf", "model.lora.gguf"):
        (tmp_path / name).write_bytes(b"mine")
        with pytest.raises(OutputExistsError, match=f"{name}: .*--overwrite"):
            export_quantized(q, tmp_path / "model.gguf", "gguf")
        assert (tmp_path / name).read_bytes() == b"mine"
        (tmp_path / name).unlink()


def test_quantize_and_recover_refuse_occupied_outputs_before_any_work(tmp_path, files):
    out = tmp_path / "out"
    mine = _mine(out)
    missing = tmp_path / "no-such-model"  # loading it would fail: the output is checked first
    with pytest.raises(OutputExistsError, match=r"out: the output directory already exists.*--overwrite"):
        quantize_to_dir(missing, files["cfg"], out)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        recover_to_dir(missing, missing, out, RecoverOptions())
    assert mine.read_text() == "keep me"
    report = tmp_path / "r.json"
    report.write_text("{}")
    assert main(["quantize", str(missing), "--config", str(files["cfg"]), "--out", str(tmp_path / "x"),
                 "--json", str(report)]) == 2
    assert main(["recover", str(missing), "--teacher", str(missing), "--out", str(tmp_path / "x"),
                 "--json", str(report)]) == 2
    assert report.read_text() == "{}" and not (tmp_path / "x").exists()
    assert main(["recover", str(missing), "--teacher", str(missing), "--out", str(tmp_path / "x"),
                 "--time-budget", "0"]) == 2


# --- reported figures -------------------------------------------------------------------------

def test_reported_perplexities_are_those_of_the_saved_directories(tmp_path, files, capsys):
    from transformers import AutoTokenizer

    q, r = tmp_path / "q", tmp_path / "r"
    assert main(["quantize", str(files["src"]), "--config", str(files["cfg"]), "--out", str(q), "--no-progress",
                 "--eval-task", files["task"], "--json", "-"]) == 0
    reported = json.loads(capsys.readouterr().out)["ppl"]  # --json -: the summary alone on stdout
    assert main(["eval", str(q), files["task"], "--split", "heldout", "--no-progress",
                 "--json", str(tmp_path / "eval.json")]) == 0
    assert reported == json.loads((tmp_path / "eval.json").read_text())["tiny-ppl"]["ppl"]
    with pytest.raises(OutputExistsError):
        quantize_to_dir(files["src"], files["cfg"], q, eval_task=None)
    assert quantize_to_dir(files["src"], files["cfg"], q, eval_task=None, overwrite=True)["out"] == str(q)

    opts = RecoverOptions(steps=3, block_steps=2, seq_len=32, max_tokens=256, block_tokens=128, top_k=8)
    rec = recover_to_dir(q, files["src"], r, opts, files["corpus"], files["task"])
    tok = AutoTokenizer.from_pretrained(r)
    assert rec["ppl_after"] == heldout_perplexity(load_quantized(r), tok, files["task"])
    assert json.loads((r / "quant_config.json").read_text())["recovery"]["ppl_after"] == rec["ppl_after"]
    assert set(rec["phases"]) == {"load", "teacher_cache", "blocks", "e2e", "save_eval"}


# --- time budget ------------------------------------------------------------------------------

def _within_shares(phases: dict) -> None:
    for name, p in phases.items():
        if p["share"] is not None:
            assert p["seconds"] <= p["share"] + TOL, (name, phases)


def test_time_budget_bounds_the_whole_recover_call(tmp_path, files, one_thread):
    q = _quantized(tmp_path, files["src"])
    budget = 4.0
    opts = RecoverOptions(steps=100_000, block_steps=100_000, seq_len=32, max_tokens=1024, block_tokens=256,
                          top_k=8, dtype="float32", time_budget=budget, checkpoint_every=10)
    t0 = time.perf_counter()
    rec = recover_to_dir(q, files["src"], tmp_path / "r", opts, files["corpus"], files["task"])
    wall = time.perf_counter() - t0
    phases = rec["phases"]
    print(json.dumps({"wall": wall, "steps": rec["steps"], "phases": phases}))
    assert wall <= budget + phases["save_eval"]["seconds"] + TOL, (wall, phases)
    assert rec["seconds"] <= budget + TOL
    assert sum(p["seconds"] for p in phases.values()) == pytest.approx(wall, abs=0.3)
    _within_shares(phases)
    assert phases["blocks"]["share"] == pytest.approx(
        opts.block_fraction * (budget - phases["load"]["seconds"]), abs=0.05)
    assert rec["steps"] < opts.steps and rec["e2e_windows"] <= rec["windows"]
    assert json.loads((tmp_path / "r" / "quant_config.json").read_text())["recovery"]["phases"] == phases


def _slow_setup(tmp_path, delay: float):
    """A teacher whose every block forward takes `delay` seconds more (a big model on a slow CPU)."""
    src = save_tiny_model(tmp_path / "src", "llama")
    teacher = AutoModelForCausalLM.from_pretrained(src).eval()
    for block in decoder_blocks(teacher):
        block.register_forward_pre_hook(lambda *_: time.sleep(delay))
    student = AutoModelForCausalLM.from_pretrained(src).eval()
    quantize_model(student, quant_config_from_dict({"bits": 2, "group_size": 16, "lora": {"rank": 2}}))
    windows = torch.randint(3, VOCAB, (32, 16), generator=torch.Generator().manual_seed(1))
    return teacher, student, windows


def test_a_short_budget_caches_fewer_windows_and_skips_blocks_within_each_share(tmp_path, one_thread):
    teacher, student, windows = _slow_setup(tmp_path, 0.1)  # a cache batch: 0.4 s, all 8 batches: 3.2 s
    opts = RecoverOptions(steps=100_000, block_steps=100_000, seq_len=16, max_tokens=512, block_tokens=256,
                          batch_size=4, top_k=8, dtype="float32", time_budget=3.0)
    t0 = time.perf_counter()
    result = Recovery(student, windows, opts, tmp_path / "work", lambda: teacher).run()
    wall = time.perf_counter() - t0
    phases = result["phases"]
    print(json.dumps({"wall": wall, "phases": phases, "e2e_windows": result["e2e_windows"],
                      "blocks_skipped": result.get("blocks_skipped", 0)}))
    assert wall <= opts.time_budget + TOL, phases
    _within_shares(phases)
    assert 0 < result["e2e_windows"] < len(windows)  # the cache ran out of time: e2e trains on fewer windows
    assert result["step"] > 0


def test_a_budgeted_run_resumes_on_its_clock(tmp_path, one_thread):
    teacher, student, windows = _slow_setup(tmp_path, 0.0)
    opts = RecoverOptions(steps=100_000, block_steps=100_000, seq_len=16, max_tokens=512, block_tokens=256,
                          batch_size=4, top_k=8, dtype="float32", time_budget=5.0, checkpoint_every=2)

    class Killed(Exception):
        pass

    def kill(phase, done, total, loss):
        if phase == "e2e" and done == 5:  # after the step-4 checkpoint
            raise Killed

    with pytest.raises(Killed):
        Recovery(student, windows, opts, tmp_path / "work", lambda: teacher, kill).run()
    ck = torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=True)["state"]
    assert ck["step"] == 4 and ck["phases"]["blocks"] > 0
    t0 = time.perf_counter()
    result = Recovery(student, windows, opts, tmp_path / "work", lambda: teacher).run()
    assert time.perf_counter() - t0 <= opts.time_budget - ck["elapsed"] + TOL  # the budget left, not a new one
    assert result["elapsed"] <= opts.time_budget + TOL and result["step"] > 4
    assert result["phases"]["blocks"]["seconds"] == pytest.approx(ck["phases"]["blocks"])  # not run again
    _within_shares(result["phases"])
    rows = [json.loads(line) for line in (tmp_path / "work" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "e2e"] == list(range(result["step"]))
