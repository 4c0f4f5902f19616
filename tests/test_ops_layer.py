"""The operations layer: one function per action under both the CLI and the UI.

- layering: nothing outside ``workbench/cli`` imports a CLI module, and the library below the
  operations layer imports neither it nor the UI;
- bad inputs fail before work with one line, through the CLI (exit 2) and through the UI (a
  notification; the app stays usable and the next job runs);
- the CLI and the UI write identical files for the same merge.
"""

from __future__ import annotations

import ast
import errno
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import save_tiny_model, write_tiny_task
from workbench.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / "workbench"
LIBRARY = ("models", "merge", "eval", "search", "quant", "export", "zoo", "tasks")   # below ops


def imports_of(path: Path) -> set[str]:
    """Every module a file imports (top level or inside functions), absolute names."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_nothing_imports_a_cli_module_and_the_library_stays_below_ops():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        mods = imports_of(path)
        if rel.parts[0] != "cli" and any(m == "workbench.cli" or m.startswith("workbench.cli.") for m in mods):
            offenders.append(f"{rel}: imports the CLI")
        if rel.parts[0] in LIBRARY:
            up = sorted(m for m in mods if m.split(".")[:2] in (["workbench", "ops"], ["workbench", "tui"]))
            if up:
                offenders.append(f"{rel}: imports {', '.join(up)}")
    assert not offenders, offenders
    # and the check sees imports at all (it cannot pass vacuously)
    assert "workbench.ops.merge.merge" in imports_of(PACKAGE / "cli" / "merge.py")


# --- bad inputs through the CLI -----------------------------------------------------------------

def cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    if rc:
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return rc, err


def test_an_empty_task_file_and_a_task_line_that_is_not_json(tmp_path, capsys, monkeypatch):
    import workbench.models.loader as loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    model = save_tiny_model(tmp_path / "m")
    header = write_tiny_task(tmp_path / "t.yml")
    items = header.parent / "tiny.jsonl"
    lines = items.read_text().splitlines()
    items.write_text("")
    rc, err = cli(capsys, "eval", model, header, "--no-progress")
    assert rc == 2 and str(items) in err and "no items" in err
    items.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    rc, err = cli(capsys, "eval", model, header, "--no-progress")
    assert rc == 2 and f"{items}:2" in err and "JSON" in err


def test_a_group_size_that_divides_no_row_is_refused_before_quantizing(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "m")          # rows of 32 and 64
    cfg = tmp_path / "g48.yml"
    cfg.write_text("bits: 2\ngroup_size: 48\n")
    out = tmp_path / "q"
    rc, err = cli(capsys, "quantize", model, "--config", cfg, "--out", out, "--no-eval", "--no-progress")
    assert rc == 2 and "48" in err and "model.layers.0.self_attn.q_proj" in err
    assert not out.exists() and not list(tmp_path.glob(".q.*"))


def quantized_with_adapters(tmp_path: Path, capsys) -> Path:
    """A tiny float model at tmp/m, quantized with rank-2 adapters into tmp/q; returns the float one."""
    model = save_tiny_model(tmp_path / "m")
    cfg = tmp_path / "q.yml"
    cfg.write_text("bits: 2\ngroup_size: 16\nlora: {rank: 2}\n")
    assert cli(capsys, "quantize", model, "--config", cfg, "--out", tmp_path / "q", "--no-eval",
               "--no-progress")[0] == 0
    return model


def test_recovery_refuses_a_teacher_with_another_tokenizer(tmp_path, capsys):
    model = quantized_with_adapters(tmp_path, capsys)
    other = save_tiny_model(tmp_path / "other")     # same shapes, a tokenizer with one token renamed
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    renamed = next(t for t in vocab if t.startswith("w"))   # a word of the tiny word-level vocabulary
    vocab[renamed + "X"] = vocab.pop(renamed)
    (other / "tokenizer.json").write_text(json.dumps(tok))
    rc, err = cli(capsys, "recover", tmp_path / "q", "--teacher", other, "--out", tmp_path / "r",
                  "--steps", "1", "--block-steps", "0", "--no-eval", "--no-progress")
    assert rc == 2 and "tokenizer differs" in err and (repr(renamed) in err or repr(renamed + "X") in err)
    assert not (tmp_path / "r").exists()


def test_a_full_disk_outside_an_atomic_write_is_one_line(tmp_path, capsys, monkeypatch):
    import workbench.ops.merge as ops_merge

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "history.jsonl"))

    monkeypatch.setattr(ops_merge, "validate", full)
    rc, err = cli(capsys, "recipe", "validate", tmp_path / "r.yml")
    assert rc == 2 and "history.jsonl" in err and "No space left on device" in err


# --- the UI: the same actions, the same files, the same errors ------------------------------------

pytest.importorskip("textual")
pytest.importorskip("pytest_asyncio")


@pytest.fixture
def ui(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    base, a, b = tiny_models("llama", 3)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n"
                      f"  - {{model: {a}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
                      f"  - {{model: {b}, parameters: {{weight: 0.5, density: 0.5}}}}\n"
                      "parameters: {normalize: true}\n")
    return base, a, b, recipe


async def merge_in_ui(pilot, recipe: Path, out: Path) -> None:
    from textual.widgets import Input

    from tests.test_tui import click

    screen = pilot.app.screen
    screen.query_one("#recipe-path", Input).value = str(recipe)
    await click(pilot, "#open")
    screen.query_one("#merge-out", Input).value = str(out)
    await click(pilot, "#merge")


@pytest.mark.asyncio
async def test_the_ui_and_the_cli_merge_to_identical_files(ui, tmp_path, capsys):
    from tests.test_tui import SIZE, notifications, wait_until
    from workbench.tui.app import WorkbenchApp
    from workbench.tui.config import TuiConfig

    *_, recipe = ui
    app = WorkbenchApp(TuiConfig(runs_dir=tmp_path / "runs"))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        await merge_in_ui(pilot, recipe, tmp_path / "ui")
        await wait_until(pilot, lambda: app.screen.result is not None, what="the merge")
        await app.workers.wait_for_complete()
        assert not notifications(app, "error")
    assert cli(capsys, "merge", recipe, tmp_path / "cli", "--no-progress")[0] == 0
    ui_files = sorted(p.name for p in (tmp_path / "ui").iterdir())
    assert ui_files == sorted(p.name for p in (tmp_path / "cli").iterdir())
    for name in ui_files:
        ours, theirs = tmp_path / "ui" / name, tmp_path / "cli" / name
        if name.endswith(".safetensors"):
            a, b = load_file(str(ours)), load_file(str(theirs))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:   # config, tokenizer, recipe, model card: the card names the output directory
            assert re.sub(r"\bui\b", "OUT", ours.read_text()) == re.sub(r"\bcli\b", "OUT", theirs.read_text()), name


def cut_short(model: Path) -> Path:
    f = model / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    return f


def put_nan(model: Path) -> None:
    from tests.test_input_checks import put_value

    put_value(model, "model.layers.1.mlp.up_proj.weight", float("nan"))


@pytest.mark.asyncio
@pytest.mark.parametrize("damage, expected", [
    (cut_short, "cut short"),
    (put_nan, "non-finite"),
])
async def test_a_broken_model_is_a_notification_and_the_app_stays_usable(ui, tmp_path, damage, expected):
    import shutil

    from tests.test_tui import SIZE, notifications, wait_until
    from workbench.tui.app import WorkbenchApp
    from workbench.tui.config import TuiConfig

    base, a, b, recipe = ui
    good_b = tmp_path / "b-copy"
    shutil.copytree(b, good_b)
    damage(b)
    app = WorkbenchApp(TuiConfig(runs_dir=tmp_path / "runs"))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        screen = app.screen
        await merge_in_ui(pilot, recipe, tmp_path / "out")
        await wait_until(pilot, lambda: notifications(app, "error"), what="the error")
        message = notifications(app, "error")[-1].message
        assert expected in message and str(b) in message and "\n" not in message
        await app.workers.wait_for_complete()
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
        assert not screen.query_one("#merge").disabled and not screen.job_running("merge")
        # the app is still usable: the repaired recipe merges
        recipe.write_text(recipe.read_text().replace(str(b), str(good_b)))
        await merge_in_ui(pilot, recipe, tmp_path / "out")
        await wait_until(pilot, lambda: screen.result is not None, what="the merge after the error")
        assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.asyncio
async def test_a_quant_config_that_fits_no_row_is_a_notification_in_the_quantize_screen(ui, tmp_path):
    from tests.test_tui import SIZE, fill_quantize, notifications, wait_until
    from workbench.tui.app import WorkbenchApp
    from workbench.tui.config import TuiConfig

    base, *_ = ui
    cfg = tmp_path / "g48.yml"
    cfg.write_text("bits: 2\ngroup_size: 48\n")
    app = WorkbenchApp(TuiConfig(runs_dir=tmp_path / "runs"))
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f6")
        screen = app.screen
        fill_quantize(screen, model=str(base), config=str(cfg), minutes="0", out=str(tmp_path / "q"))
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: notifications(app, "error"), what="the error")
        assert "48" in notifications(app, "error")[-1].message
        await app.workers.wait_for_complete()
        assert not screen.running and not (tmp_path / "q").exists()
        assert not screen.query_one("#quant-run").disabled


# --- files read back never run code ----------------------------------------------------------------

class _Plant:
    """Unpickled, this would create the marker file (what an attacker's payload would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_recovery_checkpoint_is_refused_unread(tmp_path, capsys):
    model = quantized_with_adapters(tmp_path, capsys)
    marker = tmp_path / "pwned"
    work = tmp_path / "r.work"
    work.mkdir()
    torch.save({"trainable": {}, "state": _Plant(marker)}, work / "checkpoint.pt")   # a shared run's work dir
    rc, err = cli(capsys, "recover", tmp_path / "q", "--teacher", model, "--out", tmp_path / "r",
                  "--steps", "1", "--block-steps", "0", "--no-eval", "--no-progress")
    assert rc == 2 and str(work / "checkpoint.pt") in err and "refused unread" in err
    assert not marker.exists() and not (tmp_path / "r").exists()


def test_a_crafted_zoo_checkpoint_is_refused_unread(tmp_path):
    from workbench.errors import WorkbenchError
    from workbench.models.checkpoint import load_training_state

    marker = tmp_path / "pwned"
    torch.save({"step": 3, "losses": [_Plant(marker)]}, tmp_path / "checkpoint.pt")
    with pytest.raises(WorkbenchError, match="refused unread"):
        load_training_state(tmp_path / "checkpoint.pt")
    assert not marker.exists()
    torch.save({"step": 3, "losses": [1.0]}, tmp_path / "ok.pt")   # and a plain one loads
    assert load_training_state(tmp_path / "ok.pt") == {"step": 3, "losses": [1.0]}


def test_export_names_what_it_found_instead_of_a_compressed_directory(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    for qdir, found in ((model, "a float model directory"), (tmp_path / "empty", "an empty directory"),
                        (tmp_path / "junk", "holding notes.txt"), (tmp_path / "nope", "nothing is there")):
        rc, err = cli(capsys, "export", qdir, "--format", "hf", "--out", tmp_path / "out")
        assert rc == 2 and str(qdir) in err and found in err, err
    assert not (tmp_path / "out").exists()


def test_a_nan_weight_stops_quantize_unless_allowed(tmp_path, capsys):
    from tests.test_input_checks import put_value

    model = save_tiny_model(tmp_path / "m")
    put_value(model, "model.layers.2.self_attn.k_proj.weight", float("inf"))
    cfg = tmp_path / "q.yml"
    cfg.write_text("bits: 2\ngroup_size: 16\n")
    rc, err = cli(capsys, "quantize", model, "--config", cfg, "--out", tmp_path / "q", "--no-eval", "--no-progress")
    assert rc == 2 and "model.layers.2.self_attn.k_proj.weight" in err and "1 non-finite" in err
    assert "--allow-nonfinite" in err and not (tmp_path / "q").exists()
    assert cli(capsys, "quantize", model, "--config", cfg, "--out", tmp_path / "q", "--no-eval", "--no-progress",
               "--allow-nonfinite")[0] == 0
