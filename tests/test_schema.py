"""The one YAML checker (workbench/schema.py) and the five readers built on it."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from workbench.schema import REQUIRED, Field, Reader, describe, is_type, parse_with_lines


class CheckError(ValueError):
    pass


def reader(lines: dict | None = None) -> Reader:
    return Reader("c.yml", lines, CheckError, root="config")


def error(value, f: Field, path: tuple = ("x",), lines: dict | None = None) -> str:
    with pytest.raises(CheckError) as e:
        reader(lines).check(value, f, path)
    return str(e.value)


# --- types -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, good, bad", [
    (int, [0, -3, 10**12], [True, False, 1.5, "1", None, [1]]),
    (float, [0, 1, -2.5, 1e-9], [True, "1.0", None, [1.0]]),
    (bool, [True, False], [0, 1, "true", None]),
    (str, ["", "a"], [3, None, ["a"], b"a"]),
    (list, [[], [1, "a"]], [(), {}, "ab", None]),
    (dict, [{}, {"a": 1}], [[], "a", None]),
    ((str, int), ["a", 3], [True, 1.5, None]),
])
def test_each_type_accepts_its_values_and_refuses_others_naming_the_value(kind, good, bad):
    f = Field(kind)
    for v in good:
        assert reader().check(v, f) == v and is_type(v, kind)
    for v in bad:
        assert not is_type(v, kind)
        assert error(v, f) == f"c.yml: x: expected {describe(f)}, got {v!r}"


def test_float_keeps_an_int_as_written_and_bool_is_never_a_number():
    assert type(reader().check(3, Field(float))) is int
    assert "got True" in error(True, Field(float))
    assert "got True" in error(True, Field(int, low=0))


# --- bounds and choices ------------------------------------------------------------------------

@pytest.mark.parametrize("f, inside", [
    (Field(int, low=3, high=7), lambda v: 3 <= v <= 7),
    (Field(int, low=0), lambda v: v >= 0),
    (Field(int, low=1), lambda v: v >= 1),
    (Field(float, positive=True), lambda v: v > 0),
    (Field(float, positive=True, high=1), lambda v: 0 < v <= 1),
    (Field(float, low=-1.5, high=2.0), lambda v: -1.5 <= v <= 2.0),
])
def test_a_value_is_accepted_exactly_when_it_is_within_bounds(f, inside):
    rng = random.Random(0)
    values = [0, 1, -1, 3, 7, 8, 2, 2.0, -1.5, 1e-12] + [rng.uniform(-10, 10) for _ in range(200)]
    values = [int(v) if f.type is int else v for v in values]
    for v in values:
        if inside(v):
            assert reader().check(v, f, ("n",)) == v
        else:
            assert error(v, f, ("n",)) == f"c.yml: n: expected {describe(f)}, got {v!r}"


def test_bounds_are_described_in_words():
    assert describe(Field(int, low=0)) == "a non-negative integer"
    assert describe(Field(int, low=1)) == "a positive integer"
    assert describe(Field(int, low=2)) == "an integer >= 2"
    assert describe(Field(float, positive=True)) == "a positive number"
    assert describe(Field(float, positive=True, high=1)) == "a number in (0, 1]"
    assert describe(Field(int, low=1, high=4)) == "an integer in [1, 4]"
    assert describe(Field(str, nonempty=True)) == "a non-empty string"


def test_choices():
    f = Field(str, "b", choices=("a", "b"))
    assert reader().check("a", f) == "a" and reader().check(None, f) == "b"
    assert error("c", f) == "c.yml: x: expected one of a, b, got 'c'"
    assert error(3, f) == "c.yml: x: expected one of a, b, got 3"


def test_nonempty_want_and_msg():
    assert error([], Field(list, nonempty=True)) == "c.yml: x: expected a non-empty list, got []"
    assert error("", Field(str, nonempty=True, want="a name")) == "c.yml: x: expected a name, got ''"
    assert error(5, Field(str, msg="give a path")) == "c.yml: x: give a path"
    assert error(5, Field(str, msg=lambda v: f"{v!r} is no path")) == "c.yml: x: 5 is no path"


# --- mappings: unknown keys, defaults, required, nested paths ----------------------------------

LORA = {"rank": Field(int, 0, low=0), "alpha": Field(float, None, positive=True),
        "init": Field(str, "svd", choices=("svd", "zeros"))}
CONFIG = Field(dict, msg="expected a mapping", fields={
    "bits": Field(int, 2), "name": Field(str), "skip": Field(list, ["lm_head"], item=str),
    "lora": Field(dict, {}, fields=LORA),
    "stages": Field(list, [], item=Field(dict, fields={"windows": Field(int, low=1), "keep": Field(int, low=1)})),
})


def test_an_unknown_key_is_refused_with_the_allowed_keys():
    msg = error({"name": "n", "lora": {"rank": 1, "colour": "red"}}, CONFIG, ())
    assert msg == "c.yml: lora.colour: unknown key; expected one of alpha, init, rank"
    msg = error({"name": "n", "bist": 2}, CONFIG, ())
    assert msg == "c.yml: bist: unknown key; expected one of bits, lora, name, skip, stages"


def test_absent_and_null_take_the_default_and_a_missing_sub_mapping_its_own_defaults():
    for data in ({"name": "n"}, {"name": "n", "bits": None, "lora": None, "skip": None}):
        got = reader().check(data, CONFIG)
        assert got == {"bits": 2, "name": "n", "skip": ["lm_head"], "stages": [],
                       "lora": {"rank": 0, "alpha": None, "init": "svd"}}
    a, b = reader().check({"name": "n"}, CONFIG), reader().check({"name": "n"}, CONFIG)
    a["skip"].append("x")
    assert b["skip"] == ["lm_head"] and CONFIG.fields["skip"].default == ["lm_head"]  # defaults are copies


def test_none_for_an_optional_field_and_required_fields():
    assert reader().check(None, Field(int, None, low=1)) is None
    assert reader().check({"name": "n", "lora": {"alpha": None}}, CONFIG)["lora"]["alpha"] is None
    assert error({}, CONFIG, ()) == "c.yml: name: required field is missing"
    assert error({"name": None}, CONFIG, ()) == "c.yml: name: expected a string, got None"
    assert error({}, Field(dict, fields={"m": Field(str, msg="name a model")}), ()) == "c.yml: m: name a model"
    assert error([1], CONFIG, ()) == "c.yml: config: expected a mapping"  # the root is named by `root`
    assert REQUIRED is Field().default


def test_a_nested_error_names_the_path_and_the_line_of_a_real_yaml_text():
    text = ("name: n\n"           # 1
            "lora:\n"             # 2
            "  rank: 4\n"         # 3
            "stages:\n"           # 4
            "  - windows: 2\n"    # 5
            "    keep: 4\n"       # 6
            "  - windows: 8\n"    # 7
            "    keep: 0\n"       # 8
            "skip: [lm_head]\n")  # 9
    data, lines = parse_with_lines(text, "c.yml", CheckError)
    with pytest.raises(CheckError) as e:
        reader(lines).check(data, CONFIG)
    assert str(e.value) == "c.yml:8: stages.1.keep: expected a positive integer, got 0"
    data["stages"][1]["keep"], data["skip"] = 1, ["lm_head", 3]
    with pytest.raises(CheckError) as e:  # an `item` type names the list, an `item` Field the element
        reader(lines).check(data, CONFIG)
    assert str(e.value) == "c.yml:9: skip: expected a list, got ['lm_head', 3]"
    data["skip"] = ["lm_head"]
    data["stages"][0]["keeps"] = 1
    with pytest.raises(CheckError) as e:  # a key the text does not have: the line of its parent
        reader(lines).check(data, CONFIG)
    assert str(e.value) == "c.yml:5: stages.0.keeps: unknown key; expected one of keep, windows"


def test_invalid_yaml_names_its_line():
    with pytest.raises(CheckError, match=r"^c.yml:3: invalid YAML"):
        parse_with_lines("a: 1\nb: [2\nc: 3\n", "c.yml", CheckError)


@dataclass(frozen=True)
class Stage:
    windows: int
    keep: int


def test_check_converts_and_make_builds_a_dataclass():
    def ternary(v, path, fail):
        if v not in ("ternary", 2):
            fail(path, f"not a format: {v!r}")
        return 1.58 if v == "ternary" else v

    f = Field(dict, fields={"bits": Field(object, 2, check=ternary), "windows": Field(int, 2, low=1),
                            "keep": Field(int, 1, low=1)},
              make=lambda bits, **kw: (bits, Stage(**kw)))
    assert reader().check({"bits": "ternary", "keep": 3}, f) == (1.58, Stage(2, 3))
    assert error({"bits": 4}, f, ()) == "c.yml: bits: not a format: 4"
    r = reader({("a",): 7})
    with pytest.raises(CheckError, match=r"^c.yml:7: a.b: custom$"):
        r.fail(("a", "b"), "custom")  # the shared fail of cross-field rules: nearest line


# --- the five readers: an unknown key is `file:line: key: ...` -------------------------------

def test_the_recipe_refuses_an_unknown_key_by_file_and_line(tmp_path):
    from workbench.errors import RecipeError
    from workbench.merge.recipe import load_recipe

    p = tmp_path / "r.yml"
    p.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n"
                 "    weigth: 1\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(e.value) == f"{p}:6: models.1.weigth: unknown key; expected one of model, parameters"
    p.write_text("merge_method: linear\nmodels: [{model: a}, {model: b}]\nmergin: 3\n")
    with pytest.raises(RecipeError, match=rf"^{p}:3: mergin: unknown key; expected one of base_model, chat_template"):
        load_recipe(p)


def test_the_merge_search_spec_refuses_an_unknown_key_by_file_and_line(tmp_path):
    from workbench.search.spec import SpecError, load_spec

    p = tmp_path / "s.yml"
    p.write_text("merge_method: linear\nmodels: [a, b]\nmutation: 0.1\nevolve: {weight: [0, 1]}\n")
    with pytest.raises(SpecError, match=rf"^{p}:3: mutation: unknown key; expected one of base_model, batch_size"):
        load_spec(p)
    p.write_text("merge_method: linear\nmodels: [a, b]\nevolve: {weight: [0, 1]}\nobjective: [t]\nbudget:\n"
                 "  generations: 2\n  populaton: 4\n")
    with pytest.raises(SpecError, match=rf"^{p}:7: budget.populaton: unknown key; expected one of generations,"):
        load_spec(p)


def test_the_quant_config_refuses_an_unknown_key_by_file_and_line(tmp_path):
    from workbench.quant.config import QuantConfigError, load_quant_config

    p = tmp_path / "q.yml"
    p.write_text("bits: 2\ngroup_size: 64\nlayers:\n  - pattern: mlp\n    bitz: 4\n")
    with pytest.raises(QuantConfigError) as e:
        load_quant_config(p)
    assert str(e.value) == f"{p}:5: layers.0.bitz: unknown key; expected one of bits, group_size, method, pattern, " \
                           "rank, skip"


def test_the_quant_search_spec_refuses_an_unknown_key_by_file_and_line(tmp_path):
    from workbench.quant.search.spec import QuantSpecError, load_quant_search_spec

    p = tmp_path / "s.yml"
    p.write_text("kind: quantization\nmodel: m\noptions:\n  formats: [{bits: 2}]\n  rank: [0, 8]\ntargets: [3]\n")
    with pytest.raises(QuantSpecError) as e:
        load_quant_search_spec(p)
    assert str(e.value) == f"{p}:5: options.rank: unknown key; expected one of formats, ranks"


def test_the_task_header_refuses_an_unknown_key_by_file_and_line(tmp_path):
    from workbench.eval.taskfile import TaskError, load_task

    p = tmp_path / "t.yml"
    p.write_text("name: t\ntype: multiple_choice\nitems: t.jsonl\ncolour: red\n")
    with pytest.raises(TaskError) as e:
        load_task(p)
    assert str(e.value).startswith(f"{p}:4: colour: unknown field (expected: chat_template, description, ")
