"""Task files: format, validation errors (file, line, field), split disjointness, the heldout guard."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml

from workbench.errors import WorkbenchError
from workbench.eval.requests import windows
from workbench.eval.taskfile import check_search_objective, load_task, normalize_text


def write_task(d: Path, header: dict, items: list, name: str = "t") -> Path:
    header = {"name": name, "items": f"{name}.jsonl", **header}
    (d / f"{name}.yml").write_text(yaml.safe_dump(header, sort_keys=False))
    lines = [x if isinstance(x, str) else json.dumps(x) for x in items]
    (d / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return d / f"{name}.yml"


def mc(split: str, i: int, gold: int = 0, n: int = 3) -> dict:
    return {"split": split, "context": f"question {i}", "choices": [f"c{j}" for j in range(n)], "gold": gold}


def test_valid_task_loads_with_defaults(tmp_path):
    path = write_task(tmp_path, {"type": "multiple_choice", "description": "d"},
                      [mc("search", i) for i in range(3)] + [mc("heldout", 9)])
    t = load_task(path)
    assert (t.name, t.type, t.target_delimiter, t.num_fewshot) == ("t", "multiple_choice", " ", 0)
    assert t.splits == ["search", "heldout"]
    assert [it.line for it in t.split_items("search")] == [1, 2, 3]
    assert len(t.fingerprint) == 64


def error_of(path: Path) -> str:
    with pytest.raises(WorkbenchError) as e:
        load_task(path)
    return str(e.value)


@pytest.mark.parametrize("bad, line, expected", [
    ({"split": "search", "context": "q", "choices": ["a", "b", "c"], "gold": 4}, 3,
     "gold: 4 is out of range for 3 choices"),
    ({"split": "search", "context": "q", "choices": ["a", "b"]}, 3, "gold: required field is missing"),
    ({"split": "search", "context": "q", "choices": ["a"], "gold": 0}, 3, "choices: expected a list of at least 2"),
    ({"split": "search", "context": "q", "choices": ["a", "b"], "gold": True}, 3, "gold: expected an integer"),
    ({"context": "q", "choices": ["a", "b"], "gold": 0}, 3, "split: required field is missing"),
    ({"split": "search", "context": "q", "choices": ["a", "b"], "gold": 0, "golden": 1}, 3,
     "golden: unknown field"),
    ('{"split": "search", "context": ', 3, "invalid JSON"),
    ("[1, 2]", 3, "an item must be a JSON object"),
])
def test_bad_items_name_file_line_and_field(tmp_path, bad, line, expected):
    path = write_task(tmp_path, {"type": "multiple_choice"}, [mc("search", 0), mc("search", 1), bad])
    msg = error_of(path)
    assert msg.startswith(f"{tmp_path / 't.jsonl'}:{line}: ")
    assert expected in msg


def test_blank_lines_keep_line_numbers(tmp_path):
    path = write_task(tmp_path, {"type": "multiple_choice"}, [mc("search", 0), "", mc("search", 1, gold=7)])
    assert error_of(path).endswith("t.jsonl:3: gold: 7 is out of range for 3 choices")


@pytest.mark.parametrize("header, field, expected", [
    ({"type": "multiple_choice", "num_fewshot": -1}, "num_fewshot", "expected an integer >= 0"),
    ({"type": "multiple_choice", "stop": ["\n"]}, "stop", "only used by type exact_match"),
    ({"type": "multiple_choice", "colour": 1}, "colour", "unknown field"),
    ({"type": "ranking"}, "type", "'ranking' is not one of"),
    ({"type": "exact_match", "normalize": ["upper"]}, "normalize", "'upper' is not one of"),
    ({"type": "exact_match", "max_new_tokens": 0}, "max_new_tokens", "expected an integer >= 1"),
    ({"type": "multiple_choice", "chat_template": "yes"}, "chat_template", "expected bool"),
    ({"type": "multiple_choice", "num_fewshot": 2}, "num_fewshot", "need a fewshot_split"),
])
def test_bad_header_fields_name_file_line_and_field(tmp_path, header, field, expected):
    path = write_task(tmp_path, header, [mc("search", 0)])
    msg = error_of(path)
    lines = path.read_text().splitlines()
    line = next(i for i, s in enumerate(lines, 1) if s.startswith(f"{field}:"))
    assert msg.startswith(f"{path}:{line}: {field}: "), msg
    assert expected in msg


def test_missing_header_field_and_items_file(tmp_path):
    (tmp_path / "a.yml").write_text("name: a\ntype: multiple_choice\n")
    assert error_of(tmp_path / "a.yml").endswith("a.yml: items: required field is missing")
    (tmp_path / "b.yml").write_text("name: b\ntype: multiple_choice\nitems: nothere.jsonl\n")
    assert error_of(tmp_path / "b.yml") == f"{tmp_path / 'b.yml'}:3: items: {tmp_path / 'nothere.jsonl'} does not exist"


def test_same_item_in_two_splits_is_an_error(tmp_path):
    items = [mc("search", 0), mc("search", 1), {**mc("heldout", 0), "choices": ["x", "y", "z"]}]
    msg = error_of(write_task(tmp_path, {"type": "multiple_choice"}, items))
    assert msg.startswith(f"{tmp_path / 't.jsonl'}:3: context: same item as line 1 (split 'search')")
    assert "splits must be disjoint" in msg
    # whitespace differences do not make a different item; exact_match prompts are checked too
    em = [{"split": "search", "prompt": "2+2 =", "answers": ["4"]},
          {"split": "fewshot", "prompt": "2+2  = ", "answers": ["4"]}]
    msg = error_of(write_task(tmp_path, {"type": "exact_match"}, em, name="e"))
    assert msg.startswith(f"{tmp_path / 'e.jsonl'}:2: prompt: same item as line 1")
    # the same item twice within one split is not a disjointness error
    load_task(write_task(tmp_path, {"type": "multiple_choice"}, [mc("search", 0), mc("search", 0)], name="d"))


def test_fewshot_needs_enough_examples_and_perplexity_files_must_exist(tmp_path):
    path = write_task(tmp_path, {"type": "multiple_choice", "num_fewshot": 3, "fewshot_split": "fewshot"},
                      [mc("search", 0), mc("fewshot", 1), mc("fewshot", 2)])
    assert "split 'fewshot' has 2 items" in error_of(path)
    path = write_task(tmp_path, {"type": "perplexity"},
                      [{"split": "search", "file": "{os_licenses}/Apache-2.0"},
                       {"split": "heldout", "file": "missing.txt"}], name="p")
    assert error_of(path) == f"{tmp_path / 'p.jsonl'}:2: file: {tmp_path / 'missing.txt'} does not exist"
    path = write_task(tmp_path, {"type": "perplexity"}, [{"split": "search", "file": "a", "text": "b"}], name="q")
    assert "q.jsonl:1: file: give exactly one of file or text" in error_of(path)
    path = write_task(tmp_path, {"type": "kl"}, [{"split": "search", "text": "w5 w6"}], name="k")
    assert error_of(path).endswith("k.yml: reference: required for type kl (the teacher model)")


def test_os_licenses_placeholder_resolves(tmp_path):
    lic = Path("/usr/share/common-licenses/Apache-2.0")
    if not lic.is_file():
        pytest.skip("no /usr/share/common-licenses on this system")
    t = load_task(write_task(tmp_path, {"type": "perplexity", "max_length": 64},
                             [{"split": "search", "file": "{os_licenses}/Apache-2.0"}]))
    assert t.document_text(t.items[0]) == lic.read_text()


def test_search_objective_guard(tmp_path):
    t = load_task(write_task(tmp_path, {"type": "multiple_choice", "num_fewshot": 1, "fewshot_split": "fewshot"},
                             [mc("search", 0), mc("heldout", 1), mc("fewshot", 2)]))
    check_search_objective(t, "search")
    with pytest.raises(WorkbenchError, match="'heldout' of task 't' is held out"):
        check_search_objective(t, "heldout")
    with pytest.raises(WorkbenchError, match="holds the few-shot examples"):
        check_search_objective(t, "fewshot")
    with pytest.raises(WorkbenchError, match="has no split 'dev'"):
        check_search_objective(t, "dev")


def test_builtin_lookup_by_name(tmp_path, monkeypatch):
    import workbench.eval.taskfile as tf

    monkeypatch.setattr(tf, "BUILTIN_DIR", tmp_path)
    write_task(tmp_path, {"type": "multiple_choice"}, [mc("search", 0)], name="tiny_mc")
    assert load_task("tiny_mc").name == "tiny_mc"
    with pytest.raises(WorkbenchError, match=r"no such task file or built-in task \(built-in: tiny_mc\)"):
        load_task("nope")


def test_normalize_text():
    assert normalize_text("  The  Answer, is: 42!\n", ["strip"]) == "The  Answer, is: 42!"
    steps = ["strip", "lower", "collapse_whitespace", "strip_punctuation"]
    assert normalize_text("  The  Answer, is: 42!\n", steps) == "the answer is 42"


@pytest.mark.parametrize("n, max_length, stride", [(2, 4, 4), (10, 4, 4), (10, 4, 2), (17, 8, 3), (9, 8, 8)])
def test_windows_score_every_token_once_within_max_length(n, max_length, stride):
    ws = windows(n, max_length, stride)
    scored = [t for _, start, end in ws for t in range(start, end)]
    assert scored == list(range(1, n))
    for begin, start, end in ws:
        assert 0 <= begin < start < end <= n
        assert end - 1 - begin <= max_length  # tokens fed to the model
    for (_, _, e1), (_, s2, e2) in itertools.pairwise(ws):
        assert s2 == e1 and e2 - s2 <= stride
