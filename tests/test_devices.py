"""`--device` on quantize, recover, eval, export, the quantization search and zoo build: cpu and auto
(CPU-only here) give exactly what a run without the option gives, a bad device is one line naming
--device before any model loads, and recovery's autocast follows the device type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model, write_quant_inputs
from safetensors.torch import load_file

from workbench.cli import main

NO_CUDA = not torch.cuda.is_available()
# cuda is refused only without CUDA; cuda:7 only with fewer than 8 devices; tpu always
BAD_DEVICES = [d for d, bad in (("cuda", NO_CUDA), ("cuda:7", torch.cuda.device_count() < 8), ("tpu", True)) if bad]
RECOVER = ["--steps", "3", "--block-steps", "2", "--seq-len", "32", "--max-tokens", "512", "--block-tokens", "256",
           "--top-k", "8", "--no-progress"]
SPEC = """kind: quantization
model: {model}
options:
  formats: [{{bits: ternary, group_size: 16}}, {{bits: 2, group_size: 16}}]
  ranks: [0, 2]
targets: [5.5]
seq_len: 32
stages: [{{windows: 2, keep: 1}}]
budget: {{generations: 1, offspring: 2}}
heldout_windows: 2
heldout_task: {task}
"""


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_KERNELS", "0")
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))


@pytest.fixture
def files(tmp_path):
    src = save_tiny_model(tmp_path / "src", "llama")
    cfg, task, corpus = write_quant_inputs(tmp_path)
    return {"src": src, "cfg": cfg, "task": str(task), "corpus": str(corpus), "tmp": tmp_path}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def _losses(path: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (path / "loss.jsonl").read_text().splitlines()]
    return [(r["phase"], r.get("block"), r["step"], r["loss"]) for r in rows]


# --- the hqq solve and the autocast choice ---------------------------------------------------------

@pytest.mark.parametrize("shape,max_code", [((64, 4, 16), 3), ((32, 2, 64), 15), ((8, 1, 32), 1)])
def test_hqq_solve_is_the_hqq_packages_own_on_the_cpu(shape, max_code):
    """Our float32 loop (kept on every device) against hqq's optimize_weights_proximal on the CPU."""
    from hqq.core.optimize import optimize_weights_proximal

    from workbench.quant.quantizers import hqq_scale_zero

    g = torch.randn(shape, generator=torch.Generator().manual_seed(max_code))
    rows = g.reshape(-1, g.shape[-1])
    lo, hi = rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True)
    inv = torch.where((hi - lo).abs() <= 1e-4, torch.ones_like(lo), max_code / (hi - lo)).clamp(max=2e4)
    _, inv_ref, zero_ref = optimize_weights_proximal(rows, inv, -lo * inv, [0, max_code], axis=1, device="cpu")
    scale, zero = hqq_scale_zero(g, max_code)
    assert scale.shape == zero.shape == (*shape[:-1], 1)
    assert torch.equal(scale.reshape(-1), (1.0 / inv_ref).reshape(-1))
    assert torch.equal(zero.reshape(-1), zero_ref.reshape(-1))


def test_recovery_autocast_follows_the_device_type():
    from workbench.quant.recover import autocast, autocast_spec

    assert autocast_spec("bfloat16", "cpu") == ("cpu", torch.bfloat16, True)
    assert autocast_spec("bfloat16", torch.device("cuda")) == ("cuda", torch.bfloat16, True)
    assert autocast_spec("bfloat16", torch.device("cuda", 1)) == ("cuda", torch.bfloat16, True)
    assert autocast_spec("float32", torch.device("cuda"))[2] is False
    assert autocast_spec("float32", "cpu")[2] is False
    with pytest.raises(ValueError, match="bfloat16"):
        autocast_spec("float16", "cpu")
    x = torch.randn(4, 8)
    with autocast("bfloat16", torch.device("cpu")):
        assert (x @ x.t()).dtype == torch.bfloat16
    with autocast("float32", "cpu"):
        assert (x @ x.t()).dtype == torch.float32


def test_a_quantized_layer_moved_to_another_device_drops_its_cached_codes():
    from workbench.quant.linear import QuantLinear
    from workbench.quant.quantizers import quantize_weight

    m = QuantLinear.from_quantized(quantize_weight(torch.randn(8, 32), 2, 16, "rtn"))
    m.keep_unpacked = True
    assert m.codes().device.type == "cpu" and m._codes is not None
    m.to("meta")   # any other device: codes from the stale CPU cache would mix devices
    assert m.codes().device.type == "meta"


# --- cpu and auto give today's results ----------------------------------------------------------------

def test_quantize_recover_export_with_cpu_and_auto_equal_a_run_without_the_option(files, capsys):
    from transformers import AutoModelForCausalLM

    from workbench.quant.config import load_quant_config
    from workbench.quant.model import quantize_model, save_quantized

    src, cfg, tmp = files["src"], files["cfg"], files["tmp"]
    # the library path, no device anywhere: the reference the commands must reproduce
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    quantize_model(model, load_quant_config(cfg))
    save_quantized(model, tmp / "lib", src, load_quant_config(cfg))
    reports = {}
    for name, extra in (("none", []), ("cpu", ["--device", "cpu"]), ("auto", ["--device", "auto"])):
        q, r, hf = tmp / f"q-{name}", tmp / f"r-{name}", tmp / f"hf-{name}"
        assert main(["quantize", str(src), "--config", str(cfg), "--out", str(q), "--no-progress",
                     "--eval-task", files["task"], "--json", str(tmp / f"q-{name}.json")] + extra) == 0
        assert main(["recover", str(q), "--teacher", str(src), "--out", str(r), "--corpus", files["corpus"],
                     "--eval-task", files["task"], "--json", str(tmp / f"r-{name}.json")] + RECOVER + extra) == 0
        assert main(["export", str(r), "--format", "hf", "--out", str(hf)] + extra) == 0
        reports[name] = (json.loads((tmp / f"q-{name}.json").read_text()),
                         json.loads((tmp / f"r-{name}.json").read_text()))
    capsys.readouterr()
    _same_tensors(tmp / "lib", tmp / "q-none")
    for name in ("cpu", "auto"):
        _same_tensors(tmp / "q-none", tmp / f"q-{name}")
        _same_tensors(tmp / "r-none", tmp / f"r-{name}")
        _same_tensors(tmp / "hf-none", tmp / f"hf-{name}")
        assert _losses(tmp / f"r-{name}") == _losses(tmp / "r-none")
        (q0, r0), (q1, r1) = reports["none"], reports[name]
        assert (q1["ppl_float"], q1["ppl"]) == (q0["ppl_float"], q0["ppl"])
        assert (r1["ppl_before"], r1["ppl_after"], r1["steps"]) == (r0["ppl_before"], r0["ppl_after"], r0["steps"])
    assert reports["none"][1]["steps"] == 3 and _tensors(tmp / "r-none").keys() == _tensors(tmp / "q-none").keys()
    # recovery trained something: the adapters moved from their quantized start
    assert not torch.equal(_tensors(tmp / "r-none")["model.layers.0.self_attn.q_proj.lora_B"],
                           _tensors(tmp / "q-none")["model.layers.0.self_attn.q_proj.lora_B"])


def test_gguf_export_on_the_cpu_device_equals_the_default(files):
    from workbench.export.gguf import export_gguf

    src, tmp = files["src"], files["tmp"]
    assert main(["quantize", str(src), "--config", str(files["cfg"]), "--out", str(tmp / "q"), "--no-eval",
                 "--no-progress"]) == 0
    export_gguf(tmp / "q", tmp / "a.gguf", tokenizer=False)
    export_gguf(tmp / "q", tmp / "b.gguf", tokenizer=False, device=torch.device("cpu"))
    assert (tmp / "a.gguf").read_bytes() == (tmp / "b.gguf").read_bytes()


def test_eval_metrics_with_cpu_and_auto_equal_a_run_without_the_option(files, capsys):
    tmp = files["tmp"]
    metrics = {}
    for name, extra in (("none", []), ("cpu", ["--device", "cpu"]), ("auto", ["--device", "auto"])):
        out = tmp / f"e-{name}.json"
        assert main(["eval", str(files["src"]), files["task"], "--split", "heldout", "--no-progress",
                     "--json", str(out)] + extra) == 0
        metrics[name] = {t: {k: v for k, v in r.items() if k != "seconds"}
                         for t, r in json.loads(out.read_text()).items()}
    capsys.readouterr()
    assert metrics["none"]["tiny-ppl"]["ppl"] > 1
    assert metrics["cpu"] == metrics["none"] == metrics["auto"]


def test_quant_search_with_auto_equals_cpu(files, monkeypatch, capsys):
    """--device auto used to be refused for a quantization search; here it must be the CPU's run."""
    from workbench.quant.search.run import read_front

    tmp = files["tmp"]
    spec = tmp / "qs.yml"
    spec.write_text(SPEC.format(model=files["src"], task=files["task"]))
    runs = {}
    for name in ("cpu", "auto"):
        monkeypatch.setenv("WORKBENCH_HOME", str(tmp / f"home-{name}"))   # each builds its own layer database
        run = tmp / f"run-{name}"
        assert main(["search", str(spec), "--out", str(run), "--device", name, "--no-progress"]) == 0
        history = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                   for line in (run / "history.jsonl").read_text().splitlines()]
        front = read_front(run)
        runs[name] = (history, [(p["config"], p["fitness"], p["heldout_kl"], p["heldout_ppl"]) for p in front["front"]])
    capsys.readouterr()
    assert runs["cpu"][0] and runs["cpu"] == runs["auto"]


# --- a bad device: one line, before any model loads --------------------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    """Any model load (or the zoo's base preparation) fails the test."""
    import workbench.models.default_model as default_model
    import workbench.models.loader as loader
    import workbench.quant.model as qmodel

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before --device was checked")

    for module, name in ((loader, "load_model"), (qmodel, "load_quantized"), (qmodel, "empty_model"),
                         (default_model, "prepare_default")):
        monkeypatch.setattr(module, name, refuse)


def _commands(files: dict, tmp: Path) -> dict[str, list[str]]:
    spec = tmp / "qs.yml"
    spec.write_text(SPEC.format(model=files["src"], task=files["task"]))
    src = str(files["src"])
    return {
        "quantize": ["quantize", src, "--config", str(files["cfg"]), "--out", str(tmp / "q")],
        "recover": ["recover", src, "--teacher", src, "--out", str(tmp / "r")],
        "eval": ["eval", src, files["task"]],
        "export": ["export", src, "--format", "hf", "--out", str(tmp / "hf")],
        "search": ["search", str(spec), "--out", str(tmp / "run")],
        "search --recover": ["search", "--recover", str(tmp / "run")],
        "zoo build": ["zoo", "build"],
    }


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_a_bad_device_is_one_line_naming_it_before_any_model_loads(files, no_loading, device, capsys):
    tmp = files["tmp"]
    for command, argv in _commands(files, tmp).items():
        assert main(argv + ["--device", device]) == 2, command
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: --device " + device), (command, err)
        assert "cpu, cuda, cuda:N or auto" in err or "CUDA is not available" in err or "CUDA device" in err
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp.iterdir() if p.name in ("q", "r", "hf", "run")) == []


def test_the_ops_functions_refuse_a_bad_device_before_their_inputs(tmp_path):
    from workbench.errors import WorkbenchError
    from workbench.ops import evaluate, qsearch, quant, zoo
    from workbench.quant.options import RecoverOptions

    missing = tmp_path / "missing"   # were it read first, the error would name it
    calls = [lambda: quant.quantize(missing, missing, tmp_path / "q", device="tpu"),
             lambda: quant.recover(missing, missing, tmp_path / "r", RecoverOptions(), device="tpu"),
             lambda: quant.export(missing, tmp_path / "e", "hf", device="tpu"),
             lambda: quant.quantize_recover_export(missing, missing, tmp_path / "q", device="tpu"),
             lambda: evaluate.evaluate(missing, ["no-such-task"], device="tpu"),
             lambda: qsearch.open_quant_run(missing, tmp_path / "run", device="tpu"),
             lambda: qsearch.recover_points(missing, ["targets"], 1.0, device="tpu"),
             lambda: zoo.build(device="tpu")]
    for call in calls:
        with pytest.raises(WorkbenchError, match=r"^--device tpu: expected cpu, cuda, cuda:N or auto$"):
            call()


# --- the UI's setting -----------------------------------------------------------------------------------

def test_ui_device_setting_is_read_and_checked(tmp_path):
    from workbench.errors import WorkbenchError
    from workbench.tui.config import checked_device, device_choices, load_config

    assert load_config(tmp_path).device == "auto"
    for value in ("cpu", "cuda", "cuda:1", "auto"):
        (tmp_path / "config.yml").write_text(f"device: {value}\n")
        cfg = load_config(tmp_path)
        assert cfg.device == value and not cfg.warnings
    for value in ("tpu", "cuda:x", 3):
        (tmp_path / "config.yml").write_text(f"device: {value}\n")
        cfg = load_config(tmp_path)
        assert cfg.device == "auto" and len(cfg.warnings) == 1 and "device" in cfg.warnings[0]
    assert [v for _, v in device_choices("auto")] == ["auto", "cpu", "cuda"]
    assert [v for _, v in device_choices("cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]
    assert checked_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if NO_CUDA:
        with pytest.raises(WorkbenchError, match="CUDA is not available"):
            checked_device("cuda")


@pytest.mark.skipif(not NO_CUDA, reason="cuda is a valid device here")
@pytest.mark.asyncio
async def test_quantize_screen_refuses_a_device_it_cannot_have_before_any_job(files):
    pytest.importorskip("textual")
    from textual.widgets import Input, Select

    from workbench.tui.app import WorkbenchApp
    from workbench.tui.config import TuiConfig

    app = WorkbenchApp(TuiConfig(runs_dir=files["tmp"] / "runs", device="cuda"))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("f6")
        screen = app.screen
        assert screen.query_one("#quant-device", Select).value == "cuda"   # the setting is the default
        for key, value in (("model", str(files["src"])), ("config", str(files["cfg"])),
                           ("out", str(files["tmp"] / "q"))):
            screen.query_one(f"#quant-{key}", Input).value = value
        await pilot.press("ctrl+r")
        await pilot.pause()
        errors = [n.message for n in app._notifications if n.severity == "error"]
        assert errors and errors[-1].startswith("device cuda: CUDA is not available") and not screen.running
        screen.query_one("#quant-device", Select).value = "cpu"
        plan = screen.plan()
        assert plan is not None and plan.device == "cpu"
    assert not (files["tmp"] / "q").exists()


def test_a_quantization_spec_through_ops_search_takes_the_device(tmp_path):
    """`ops.search.open_search` with a quantization spec checks `device` (here: no CUDA) before the
    spec's model is touched, and refuses a parallel backend in one line."""
    from pathlib import Path

    from workbench.errors import WorkbenchError
    from workbench.ops.search import open_search

    spec = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-quant-short-search.yml"
    with pytest.raises(WorkbenchError, match=r"^--device cuda: CUDA is not available here"):
        open_search(spec, tmp_path / "run", device="cuda")
    with pytest.raises(WorkbenchError, match="--backend processes serves merge searches only"):
        open_search(spec, tmp_path / "run", backend="processes")
    assert not (tmp_path / "run").exists()
