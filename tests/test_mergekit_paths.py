"""Recipes that name models by short names (resolved in the workbench home) reach mergekit by
absolute path: the merged model's mergekit_config.yml, `recipe export`, `recipe validate
--mergekit-paths`; and a missing model that workbench makes says which command makes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import save_tiny_model
from workbench.cli import main
from workbench.errors import RecipeError, WorkbenchError
from workbench.home import DEFAULT_MODEL_NAME
from workbench.merge.executor import execute_merge
from workbench.merge.plan import plan_merge
from workbench.merge.recipe import dump_recipe, load_recipe, parse_recipe, write_resolved_recipe

BASE, VAR_A, VAR_B = DEFAULT_MODEL_NAME, f"{DEFAULT_MODEL_NAME}-variant-a", f"{DEFAULT_MODEL_NAME}-variant-b"

TIES = f"""\
# a TIES merge by short names
merge_method: ties
base_model: {BASE}
models:
  - model: {VAR_A}
    parameters: {{weight: 0.6, density: [0.3, 0.7]}}
  - model: {VAR_B}
    parameters:
      weight: [{{filter: mlp, value: 0.2}}, {{value: 0.4}}]
      density: 0.5
parameters: {{normalize: true}}
dtype: float32
"""

PASSTHROUGH = f"""\
merge_method: passthrough
slices:
  - sources: [{{model: {BASE}, layer_range: [0, 3]}}]
  - sources: [{{model: {VAR_A}, layer_range: [1, 4]}}]
dtype: float32
"""


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty WORKBENCH_HOME; its models/ is where short names resolve."""
    path = tmp_path / "home"
    monkeypatch.setenv("WORKBENCH_HOME", str(path))
    return path


@pytest.fixture
def home_models(home) -> dict[str, Path]:
    """The default model's name and its two demo variants' names, as tiny random models in the home."""
    models = home / "models"
    base = save_tiny_model(models / BASE, "llama", seed=0)
    return {BASE: base, VAR_A: save_tiny_model(models / VAR_A, base=base, seed=1),
            VAR_B: save_tiny_model(models / VAR_B, base=base, seed=2)}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def merge_file(recipe_path: Path, out: Path) -> Path:
    plan = plan_merge(load_recipe(recipe_path))
    try:
        execute_merge(plan, out)
    finally:
        plan.close()
    return out


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def model_refs(doc: dict) -> list[str]:
    """Every model a mergekit config names (base_model, models, slice sources)."""
    refs = [doc["base_model"]] if "base_model" in doc else []
    refs += [m["model"] for m in doc.get("models", [])]
    refs += [src["model"] for s in doc.get("slices", []) for src in s["sources"]]
    return refs


def renamed(recipe_dict: dict, paths: dict[str, Path]) -> dict:
    """``recipe_dict`` with each short name replaced by its path: what the written file must hold."""
    text = json.dumps(recipe_dict)
    for name in sorted(paths, key=len, reverse=True):
        text = text.replace(json.dumps(name), json.dumps(str(paths[name])))
    return json.loads(text)


@pytest.mark.parametrize("text, snippet", [
    (TIES, "    parameters: {weight: 0.6, density: [0.3, 0.7]}\n"),
    (PASSTHROUGH, "        layer_range: [1, 4]\n"),
], ids=["models", "slices"])
def test_merge_writes_absolute_paths_and_the_written_config_merges_the_same(home_models, tmp_path, text, snippet):
    recipe = write(tmp_path / "recipes" / "r.yml", text)   # not beside the models: they resolve in the home
    out = merge_file(recipe, tmp_path / "out")
    written = (out / "mergekit_config.yml").read_text()
    doc = yaml.safe_load(written)
    refs = model_refs(doc)
    assert refs and all(Path(r).is_absolute() and (Path(r) / "config.json").is_file() for r in refs), refs
    assert {Path(r).name for r in refs} <= set(home_models)
    assert doc == renamed(parse_recipe(text).to_dict(), home_models)   # parameters, slices, order kept
    assert snippet in written, written   # laid out like the recipes in recipes/
    assert str(home_models[BASE]) in (out / "README.md").read_text()

    again = merge_file(out / "mergekit_config.yml", tmp_path / "again")
    first, second = tensors(out), tensors(again)
    assert first.keys() == second.keys() and first
    for name in first:
        assert first[name].dtype == second[name].dtype and torch.equal(first[name], second[name]), name


def test_cli_merge_from_the_home_by_short_names(home_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write(tmp_path / "r.yml", TIES)
    assert main(["merge", str(recipe), str(tmp_path / "m"), "--no-progress"]) == 0
    doc = yaml.safe_load((tmp_path / "m" / "mergekit_config.yml").read_text())
    assert doc["base_model"] == str(home_models[BASE])


def make_run(run: Path, recipe: dict) -> Path:
    rows = [{"generation": 0, "index": 0, "score": 0.25, "recipe": recipe},
            {"generation": 1, "index": 2, "score": 0.75, "recipe": recipe},
            {"generation": 1, "index": 3, "score": None, "recipe": recipe}]
    write(run / "history.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_recipe_export_names_models_by_absolute_path_and_refuses_an_existing_file(home_models, tmp_path, capsys):
    recipe = parse_recipe(TIES).to_dict()
    run = make_run(tmp_path / "run", recipe)
    out = tmp_path / "best.yml"
    assert main(["recipe", "export", str(run), str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc == renamed(recipe, home_models)
    assert all(Path(r).is_absolute() and Path(r).is_dir() for r in model_refs(doc))
    assert load_recipe(out).to_dict() == doc

    out.write_text("keep me\n")
    capsys.readouterr()
    assert main(["recipe", "export", str(run), str(out)]) == 2
    assert "already exists" in " ".join(capsys.readouterr().err.split()) and out.read_text() == "keep me\n"
    assert main(["recipe", "export", str(run), str(out), "--overwrite"]) == 0
    assert yaml.safe_load(out.read_text()) == doc
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temporary left


def test_write_resolved_recipe_keeps_the_recipe_and_refuses_an_existing_file(home_models, tmp_path):
    recipe = write(tmp_path / "recipes" / "ties.yml", TIES)
    out = write_resolved_recipe(recipe, tmp_path / "resolved.yml")
    text = out.read_text()
    assert text.startswith("# a TIES merge by short names\n")
    assert yaml.safe_load(text) == renamed(parse_recipe(TIES).to_dict(), home_models)
    with pytest.raises(WorkbenchError, match="already exists"):
        write_resolved_recipe(recipe, out)
    write_resolved_recipe(recipe, out, overwrite=True)
    assert out.read_text() == text


def test_validate_mergekit_paths_cli(home_models, tmp_path, capsys):
    recipe = write(tmp_path / "recipes" / "ties.yml", TIES)
    out = tmp_path / "for-mergekit.yml"
    assert main(["recipe", "validate", str(recipe), "--mergekit-paths", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["base_model"] == str(home_models[BASE])
    assert main(["recipe", "validate", str(recipe), "--mergekit-paths", str(out)]) == 2
    assert "already exists" in " ".join(capsys.readouterr().err.split())
    assert main(["recipe", "validate", str(recipe), "--mergekit-paths", str(out), "--overwrite"]) == 0


def test_paths_mergekit_would_misread_are_written_explicitly(tmp_path):
    odd = str(tmp_path / "m@v1+x")
    r = parse_recipe(TIES).with_model_paths({BASE: odd})
    text = dump_recipe(r)
    assert f"base_model: {{model: {{path: {odd}}}}}" in text
    assert parse_recipe(text).base_model == odd


def ta_recipe(base: str, *models: str) -> str:
    entries = "".join(f"  - {{model: {m}, parameters: {{weight: 0.5}}}}\n" for m in models)
    return f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n{entries}"


@pytest.mark.parametrize("made, text, where, hint", [
    ([BASE], ta_recipe(BASE, VAR_A), f"4: models.0.model: model {VAR_A!r}",
     "run `workbench demo` to make the demo variants"),
    (["other"], ta_recipe(BASE, "other"), f"2: base_model: model {BASE!r}",
     "run `workbench models prepare-default` to make the default model"),
    ([BASE], ta_recipe(BASE, "other", "zoo-expert-arith"), "4: models.0.model: model 'other'",
     "run `workbench zoo build` to train the zoo experts"),
    (["other"], ta_recipe("other", "nowhere"), "4: models.0.model: model 'nowhere'", None),
], ids=["demo-variant", "default-model", "zoo-expert", "unknown"])
def test_missing_models_say_how_to_make_them(home, tmp_path, capsys, made, text, where, hint):
    for name in made:
        save_tiny_model(home / "models" / name, "llama")
    recipe = write(tmp_path / "r.yml", text)
    with pytest.raises(RecipeError) as e:
        plan_merge(load_recipe(recipe))
    msg = str(e.value)
    assert msg.startswith(f"{recipe}:{where} not found (looked in: "), msg
    assert "\n" not in msg and (msg.endswith(hint) if hint else "run `" not in msg), msg
    assert main(["recipe", "validate", str(recipe)]) == 2
    err = " ".join(capsys.readouterr().err.split())   # the console wraps long lines
    assert f"{where} not found" in err and (hint is None or hint in err), err


def test_repo_recipes_on_a_fresh_home_name_the_command(home):
    repo = Path(__file__).parent.parent / "recipes"
    for name, hint in (("ties.yml", "`workbench demo`"), ("zoo-ties.yml", "`workbench zoo build`")):
        with pytest.raises(RecipeError, match=hint):
            plan_merge(load_recipe(repo / name))
