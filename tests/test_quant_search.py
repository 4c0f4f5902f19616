"""The quantization search: spec checks, layer database, assembly, budget, optimizers, resume, front."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import save_tiny_model, write_quant_inputs
from workbench.quant.config import quant_config_from_dict
from workbench.quant.model import quantize_model, size_report
from workbench.quant.search import evolve
from workbench.quant.search.database import option_config
from workbench.quant.search.run import QuantSearch, open_quant_search, read_front
from workbench.quant.search.spec import QuantSpecError, load_quant_search_spec, quant_search_spec_from_dict

SPEC = """kind: quantization
model: {model}
options:
  formats: [{{bits: ternary, group_size: 16}}, {{bits: 2, group_size: 16}}, {{bits: 4, group_size: 16}}]
  ranks: [0, 4]
targets: [5.0, 7.0]
seq_len: 32
stages: [{{windows: 2, keep: 2}}, {{windows: 4, keep: 1}}]
budget: {{generations: 3, offspring: 4}}
heldout_windows: 4
heldout_task: {task}
"""


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    src = save_tiny_model(tmp_path / "src", "llama")
    _, task, _ = write_quant_inputs(tmp_path)
    spec = tmp_path / "spec.yml"
    spec.write_text(SPEC.format(model=src, task=task))
    return tmp_path, src, spec


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "history.jsonl").read_text().splitlines()]


def test_assembled_candidate_equals_its_config_quantized_from_scratch_and_fits_its_budget(setup):
    tmp_path, src, spec = setup
    search = open_quant_search(spec, tmp_path / "run")
    search.run()
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    rows = _rows(tmp_path / "run")
    assert {r["kind"] for r in rows} == {"uniform", "levelswitch"}
    for r in rows[::3]:
        config = tuple(r["config"])
        assembled = _logits(search.assemble(config), ids)
        fresh = AutoModelForCausalLM.from_pretrained(src).eval()
        quantize_model(fresh, quant_config_from_dict(option_config(search.spec, search.choice(config))))
        assert torch.equal(assembled, _logits(fresh, ids)), r
        stored = size_report(fresh)  # bits from the tensors a save writes
        assert stored["bits_per_weight_with_adapters"] == pytest.approx(r["bpw"], abs=1e-12)
        assert stored["bits_per_weight"] == pytest.approx(r["base_bpw"], abs=1e-12)
        if r["target"] is not None:
            assert r["bpw"] <= r["target"] + 1e-12


def test_point_configs_rebuild_with_workbench_quantize(setup, capsys):
    from workbench.cli import main

    tmp_path, src, spec = setup
    assert main(["search", str(spec), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    front = read_front(tmp_path / "run")
    assert front["front"] and all(a["bpw"] < b["bpw"] and a["fitness"] > b["fitness"]
                                  for a, b in zip(front["front"], front["front"][1:]))  # non-dominated
    point = front["front"][-1]
    out = tmp_path / "q"
    assert main(["quantize", str(src), "--config", str(tmp_path / "run" / point["yml"]), "--out", str(out),
                 "--no-eval"]) == 0
    meta = json.loads((out / "quant_config.json").read_text())
    assert sum(e["lora_rank"] > 0 for e in meta["layers"].values()) == sum(
        n for label, n in point["mix"].items() if not label.endswith(" r0"))
    capsys.readouterr()
    assert main(["search", "--front", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "best uniform" in out and point["yml"] in out


def test_resume_after_a_kill_gives_the_same_history(setup):
    tmp_path, _, spec = setup
    open_quant_search(spec, tmp_path / "whole").run()

    class Killed(Exception):
        pass

    scored = [0]

    def kill(row):
        scored[0] += 1
        if row["generation"] == 2 and scored[0] > 20:
            raise Killed

    with pytest.raises(Killed):
        open_quant_search(spec, tmp_path / "cut").run(on_score=kill)
    assert json.loads((tmp_path / "cut" / "checkpoint.json").read_text())["generation"] == 2
    open_quant_search(None, tmp_path / "cut", resume=True).run()
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "whole")


def test_cma_optimizer_runs_and_resumes_to_the_same_history(setup):
    tmp_path, _, spec = setup
    spec.write_text(spec.read_text() + "optimizer: cma\n")
    open_quant_search(spec, tmp_path / "whole").run()
    cut = open_quant_search(spec, tmp_path / "cut")
    cut.spec.generations = 2
    cut.run()
    open_quant_search(None, tmp_path / "cut", resume=True).run()  # spec.yml says 3 generations
    rows = _rows(tmp_path / "whole")
    assert {r["kind"] for r in rows} == {"uniform", "cma"}
    assert all(r["bpw"] <= r["target"] + 1e-12 for r in rows if r["target"] is not None)
    assert _rows(tmp_path / "cut") == rows


def test_database_is_reused_and_invalidated_when_the_weights_change(setup):
    tmp_path, src, spec = setup
    first = open_quant_search(spec, tmp_path / "a")
    assert first.db_report["built"] == first.db_report["jobs"] > 0
    again = open_quant_search(spec, tmp_path / "b")
    assert again.db_report["built"] == 0 and again.db.dir == first.db.dir
    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    model.save_pretrained(src)
    changed = open_quant_search(spec, tmp_path / "c")
    assert changed.db.dir != first.db.dir and changed.db_report["built"] > 0


def _synthetic(units=6, seed=0):
    """Options of costs 1, 2, 4 (bytes) and errors 8, 2, 0.5, units of random sensitivity: the
    fitness is sum(sensitivity x error), whose optimum under a budget brute force finds."""
    rng = np.random.default_rng(seed)
    costs = np.tile([1, 2, 4], (units, 1))
    sens = rng.uniform(0.1, 3.0, units)
    err = np.array([8.0, 2.0, 0.5])
    fit = lambda c: float(sum(sens[u] * err[o] for u, o in enumerate(c)))  # noqa: E731
    return costs, fit


@pytest.mark.parametrize("budget,seed", [(10, 0), (14, 0), (18, 0), (14, 3), (20, 7)])
def test_levelswitch_finds_the_known_optimal_allocation(budget, seed):
    costs, fit = _synthetic(seed=seed)
    best = min((c for c in itertools.product(range(3), repeat=6) if evolve.config_bytes(costs, c) <= budget), key=fit)
    score = lambda configs, windows: [fit(c) for c in configs]  # noqa: E731
    parent = evolve.repair([0] * 6, costs, budget, np.random.default_rng(0))
    parent_fit = fit(parent)
    for g in range(60):
        parent, parent_fit = evolve.levelswitch_generation(parent, parent_fit, costs, budget, 8, [(1, 3), (2, 1)],
                                                           score, evolve.generation_rng(0, 0, g))
        assert evolve.config_bytes(costs, parent) <= budget
    assert parent_fit == pytest.approx(fit(best)), (parent, best)


def test_bad_specs_name_file_line_and_field(tmp_path):
    p = tmp_path / "s.yml"
    cases = [
        ("kind: quantization\nmodel: m\noptions: {formats: [{bits: 5}]}\ntargets: [3]\n",
         r"s.yml:3: options.formats.0.bits: unknown bits 5"),
        ("kind: quantization\nmodel: m\noptions: {formats: [{bits: 2}], ranks: [0, -8]}\ntargets: [3]\n",
         r"s.yml:3: options.ranks: expected a list of distinct non-negative"),
        ("kind: quantization\nmodel: m\noptions: {formats: [{bits: 2}]}\ntargets: []\n", r"s.yml:4: targets"),
        ("kind: quantization\nmodel: m\noptions: {formats: [{bits: 2}]}\ntargets: [3]\nstages:\n"
         "  - {windows: 4, keep: 2}\n  - {windows: 2, keep: 1}\n", r"s.yml:7: stages.1: each stage"),
        ("kind: quantization\nmodel: m\noptions: {formats: [{bits: 2}]}\ntargets: [3]\ngranularity: rows\n",
         r"s.yml:5: granularity: expected one of per_layer"),
        ("kind: quantization\nmodel: m\noptions: {formats: [{bits: 2}]}\ntargets: [3]\ncolour: red\n",
         r"s.yml:5: colour: unknown key"),
    ]
    for text, match in cases:
        p.write_text(text)
        with pytest.raises(QuantSpecError, match=match):
            load_quant_search_spec(p)


def test_a_format_that_does_not_fit_a_layer_and_an_unreachable_target_are_refused(setup):
    tmp_path, src, spec = setup
    data = quant_search_spec_from_dict({"kind": "quantization", "model": str(src), "targets": [5],
                                        "options": {"formats": [{"bits": 2, "group_size": 24}]}}, "s.yml")
    with pytest.raises(QuantSpecError, match=r"group_size 24 .* does not divide the row length 32"):
        QuantSearch(data, tmp_path / "r")
    spec.write_text(spec.read_text().replace("targets: [5.0, 7.0]", "targets: [1.0]"))
    with pytest.raises(Exception, match=r"targets: 1.0 bits per weight is below the smallest config"):
        open_quant_search(spec, tmp_path / "r2")
    assert not (tmp_path / "r2").exists()


def test_cli_refuses_a_non_empty_run_dir_and_a_resume_without_checkpoint(setup, capsys):
    from workbench.cli import main

    tmp_path, _, spec = setup
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["search", str(spec), "--out", str(tmp_path / "full"), "--no-progress"]) != 0
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_example_quantization_search_specs_validate():
    from workbench.quant.search.spec import spec_kind

    specs = [p for p in sorted((Path(__file__).parent.parent / "recipes").glob("*-search.yml"))
             if spec_kind(p) == "quantization"]
    assert len(specs) >= 2
    for path in specs:
        spec = load_quant_search_spec(path)
        assert len(spec.options) >= 8 and spec.targets and spec.max_minutes


def test_recover_targets_builds_searched_and_uniform_configs_and_measures_them_held_out(setup, capsys):
    from workbench.cli import main
    from workbench.ops.qsearch import read_recovered

    tmp_path, src, spec = setup
    spec.write_text(spec.read_text().replace("targets: [5.0, 7.0]", "targets: [5.0]"))
    run = tmp_path / "run"
    assert main(["search", str(spec), "--out", str(run), "--no-progress"]) == 0
    front = read_front(run)
    t = front["targets"][0]
    assert main(["search", "--recover", str(run), "--time-budget", "0.05", "--no-progress"]) == 0
    rec = read_recovered(run)
    names = {t["searched"]["yml"].removesuffix(".yml"), t["best_uniform"]["yml"].removesuffix(".yml")}
    assert set(rec) == names
    for name, e in rec.items():
        assert (run / "points" / f"{name}-recovered" / "quant_config.json").is_file()
        assert e["bpw"] <= 5.0 + 1e-12 and e["ppl_after"] > 0 and e["kl_after"] >= 0
    searched = rec[t["searched"]["yml"].removesuffix(".yml")]
    # built from its YAML, the searched config measures what the front said before recovery
    assert searched["bpw"] == pytest.approx(t["searched"]["bpw"])
    assert searched["kl_before"] == pytest.approx(t["searched"]["heldout_kl"], rel=1e-5)
    capsys.readouterr()
    assert main(["search", "--front", str(run)]) == 0
    assert "after recovery" in capsys.readouterr().out
    assert main(["search", "--recover", str(run), "--points", "point-99", "--no-progress"]) == 2
    assert "no config point-99.yml" in capsys.readouterr().err


def test_levels_leave_out_options_a_cheaper_one_beats_and_moves_stay_on_them():
    costs = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
    errors = np.array([[4.0, 2.0, 3.0, 1.0], [4.0, 3.0, 2.0, 1.0]])  # option 2 of unit 0: dearer and worse than 1
    levels = evolve.levels_mask(costs, errors)
    assert levels.tolist() == [[True, True, False, True], [True, True, True, True]]
    rng = np.random.default_rng(0)
    for _ in range(200):
        child = evolve.level_switch((0, 0), costs, 6, rng, levels)
        assert child[0] != 2 and evolve.config_bytes(costs, child) <= 6


def test_task_fitness_is_one_minus_the_tasks_search_score(setup):
    from conftest import write_tiny_task
    from workbench.eval.evaluator import evaluate

    tmp_path, src, spec = setup
    task = write_tiny_task(tmp_path / "tiny.yml")
    spec.write_text(spec.read_text().replace("budget: {generations: 3, offspring: 4}", "budget: {generations: 1, offspring: 3}")
                    + f"fitness: {{task: {task}}}\n")
    search = open_quant_search(spec, tmp_path / "run")
    search.run()
    row = _rows(tmp_path / "run")[-1]
    fresh = AutoModelForCausalLM.from_pretrained(src).eval()
    quantize_model(fresh, quant_config_from_dict(option_config(search.spec, search.choice(tuple(row["config"])))))
    with torch.no_grad():
        (result,) = evaluate(fresh, search.tokenizer, str(task), split="search", limit=row["windows"]).values()
    assert row["fitness"] == pytest.approx(1.0 - result.score, abs=1e-6)
    heldout = dict(load_quant_search_spec(spec).to_dict())
    assert heldout["fitness"] == {"task": str(task)}
