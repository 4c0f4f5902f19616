"""The zoo's built-in task files: current with the generators, loadable, with disjoint splits."""

from __future__ import annotations

import json

import pytest
import yaml

from workbench.zoo import tasks as zt

ZOO_TASKS = ["zoo-arith", "zoo-french", "zoo-arith-french", "zoo-perplexity", "zoo-kl"]


def test_committed_task_files_are_what_the_generators_give():
    assert sorted(zt.task_files()) == sorted(ZOO_TASKS)
    assert zt.stale_tasks() == [], "run `python -m workbench.zoo.tasks` and commit workbench/tasks/"


def test_stale_files_are_detected(tmp_path):
    zt.write_tasks(tmp_path)
    assert zt.stale_tasks(tmp_path) == []
    p = tmp_path / "zoo-arith.jsonl"
    p.write_text(p.read_text().replace('"gold": 0', '"gold": 1', 1))
    assert zt.stale_tasks(tmp_path) == ["zoo-arith.jsonl"]
    assert zt.main(["--check", "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize("name", ZOO_TASKS)
def test_task_files_have_search_and_heldout_splits(name):
    head = yaml.safe_load((zt.TASKS_DIR / f"{name}.yml").read_text())
    assert head["name"] == name and (zt.TASKS_DIR / head["items"]).is_file()
    items = [json.loads(line) for line in (zt.TASKS_DIR / head["items"]).read_text().splitlines()]
    splits = {it["split"] for it in items}
    assert splits == {"search", "heldout"}
    key = (lambda it: it["context"]) if head["type"] == "multiple_choice" else (lambda it: it["file"])
    by_split = {s: {key(it) for it in items if it["split"] == s} for s in splits}
    assert not by_split["search"] & by_split["heldout"]
    if head["type"] == "multiple_choice":
        assert head["chat_template"] is True and head["target_delimiter"] == ""
        assert 80 <= len([it for it in items if it["split"] == "search"]) <= 200


@pytest.mark.parametrize("name", ZOO_TASKS)
def test_task_files_validate_with_the_evaluator(name):
    taskfile = pytest.importorskip("workbench.eval.taskfile")
    task = taskfile.load_task(name)  # a built-in task, by name
    assert task.name == name and set(task.splits) == {"search", "heldout"}
    taskfile.check_search_objective(task, "search")
    with pytest.raises(taskfile.TaskError):
        taskfile.check_search_objective(task, "heldout")
    if task.type == "kl":
        assert task.reference == "SmolLM2-135M-Instruct"
    if task.type in ("kl", "perplexity"):
        for it in task.items:
            assert len(task.document_text(it)) > 1000  # real text the OS ships
