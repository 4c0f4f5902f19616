"""Recipe schema: mergekit's form reads, round-trips, and every bad field gets a clear error."""

from __future__ import annotations

import pytest

from workbench.errors import RecipeError
from workbench.merge.recipe import dump_recipe, evaluate_setting, parse_recipe, resolve_param
from workbench.merge.methods import get_method

TIES = """\
merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: 0.6
      density: [0.2, 0.8]
  - model: b
    parameters:
      weight: [{filter: mlp, value: 0.3}, {value: 0.5}]
      density: 0.5
parameters:
  normalize: true
  lambda: 1.0
dtype: float32
out_dtype: bfloat16
tokenizer_source: base
"""

PASSTHROUGH = """\
merge_method: passthrough
slices:
  - sources:
      - model: a
        layer_range: [0, 3]
  - sources:
      - model: b
        layer_range: [1, 4]
dtype: float16
"""


def test_mergekit_forms_parse_and_round_trip():
    for text in (TIES, PASSTHROUGH):
        r = parse_recipe(text, "r.yml")
        again = parse_recipe(dump_recipe(r), "again.yml")
        assert again.to_dict() == r.to_dict()
    r = parse_recipe(TIES, "r.yml")
    assert r.merge_method == "ties" and r.base_model == "base"
    assert [m.model for m in r.models] == ["a", "b"]
    assert r.models[0].parameters["density"] == [0.2, 0.8]
    assert r.referenced_models() == ["base", "a", "b"]
    p = parse_recipe(PASSTHROUGH, "p.yml")
    assert [s.sources[0].layer_range for s in p.slices] == [(0, 3), (1, 4)]


def test_gradient_interpolates_over_depth_like_mergekit():
    # values at t spread evenly over the list, linear between neighbours
    assert evaluate_setting([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert evaluate_setting([0.2, 0.4, 0.8], "x", 1.0) == pytest.approx(0.8)
    assert evaluate_setting([True, False], "x", 0.4) is True
    assert evaluate_setting([True, False], "x", 1.0) is False


def test_filters_pick_the_first_matching_condition():
    setting = [{"filter": "mlp", "value": 0.3}, {"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]
    assert evaluate_setting(setting, "model.layers.3.mlp.up_proj.weight", 0.0) == 0.3
    assert evaluate_setting(setting, "model.layers.3.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_setting(setting, "model.norm.weight", 0.0) == 0.5


def test_per_model_overrides_slice_overrides_global():
    spec = get_method("ties").params["density"]
    scopes = [{"density": 0.9}, {"density": 0.5}, {"density": 0.1}]
    assert resolve_param("density", spec, scopes, "w", 0.0) == 0.9
    assert resolve_param("density", spec, scopes[1:], "w", 0.0) == 0.5
    assert resolve_param("density", spec, [{}, {}], "w", 0.0) == spec.default


@pytest.mark.parametrize("text, line, words", [
    (TIES.replace("dtype: float32", "dtpye: float32"), 15, ["dtpye", "unknown key"]),
    (TIES.replace("merge_method: ties", "merge_method: tiez"), 1, ["tiez", "unknown method"]),
    (TIES.replace("      density: 0.5", "      densty: 0.5"), 11, ["densty", "unknown parameter"]),
    (TIES.replace("      density: 0.5", "      density: 1.5"), 11, ["1.5", "out of range"]),
    (TIES.replace("[0.2, 0.8]", "[0.2, -0.1]"), 7, ["-0.1", "out of range"]),
    (TIES.replace("      weight: 0.6\n", ""), 5, ["weight", "missing"]),
    (TIES.replace("base_model: base\n", ""), None, ["base_model"]),
    (TIES.replace("  normalize: true", "  normalize: 3"), 13, ["normalize", "true or false"]),
    (TIES.replace("  normalize: true", "  weight: [1, [2]]"), 13, ["gradient"]),
    (TIES.replace("out_dtype: bfloat16", "out_dtype: float8"), 16, ["float8", "dtype"]),
    (PASSTHROUGH.replace("[1, 4]", "[3, 1]"), 8, ["layer_range"]),
    ("merge_method: linear\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 2], parameters: {weight: 1}}\n"
     "      - {model: b, layer_range: [0, 3], parameters: {weight: 1}}\n", 3, ["same number of layers"]),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}, {model: c}]\nparameters: {t: 0.5}\n",
     None, ["exactly 1"]),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}]\n", None, ["'t'"]),
    ("merge_method: ties\nmodels: [{model: a}]\nslices: []\n", None, ["exactly one of"]),
    ("merge_method: [ties\n", 2, ["invalid YAML"]),
    ("- just\n- a list\n", None, ["mapping"]),
])
def test_bad_recipes_name_file_line_and_field(text, line, words):
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "bad.yml")
    msg = str(e.value)
    assert msg.startswith("bad.yml"), msg
    if line is not None:
        assert msg.startswith(f"bad.yml:{line}:"), msg
    for w in words:
        assert w in msg, msg


def test_shared_parameter_under_a_model_is_refused():
    text = TIES.replace("      density: 0.5", "      density: 0.5\n      normalize: false")
    with pytest.raises(RecipeError, match="shared parameter"):
        parse_recipe(text, "bad.yml")


def test_example_recipes_in_repo_are_valid():
    from pathlib import Path

    from workbench.merge.recipe import load_recipe

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yml"))
    quant_configs = {"2bit.yml", "ternary.yml", "mixed-2bit-4bit.yml", "mixed-ternary.yml"}  # test_quant.py
    merge_recipes = [p for p in recipes if not p.name.endswith("-search.yml") and p.name not in quant_configs]
    assert len(merge_recipes) >= 5
    methods = {load_recipe(p).merge_method for p in merge_recipes}
    assert {"linear", "slerp", "ties", "dare_ties", "passthrough", "model_stock"} <= methods
