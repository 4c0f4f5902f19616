"""The search builders (issue 18): form <-> spec as plain functions, and the forms on screen (Pilot)
composing, opening, checking at the field, saving and starting specs; the plots' data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("textual")
pytest.importorskip("pytest_asyncio")
pytest.importorskip("textual_plotext")

from textual.widgets import Checkbox, Input, Label, Select, SelectionList

from test_tui import SIZE, click, env, notifications, wait_until  # noqa: F401  (env is a fixture)
from workbench.quant.search.spec import load_quant_search_spec, quant_search_spec_from_dict, spec_kind
from workbench.search.run import read_history
from workbench.search.spec import load_spec, spec_from_dict
from workbench.tui import specform as sf
from workbench.tui.app import WorkbenchApp
from workbench.tui.screens.builder import MergeBuilderScreen, QuantBuilderScreen

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def same(a, b) -> bool:
    """Two specs equal but for the file they were read from."""
    return dataclasses.replace(a, source="") == dataclasses.replace(b, source="")


async def merge_builder_on(app, pilot, path: Path) -> MergeBuilderScreen:
    """The Search screen's builder (ctrl+e) opened on the spec at ``path``."""
    app.screen.query_one("#spec-path", Input).value = str(path)
    await pilot.press("ctrl+e")
    await wait_until(pilot, lambda: isinstance(app.screen, MergeBuilderScreen), what="the builder")
    return app.screen


# --- plain functions --------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(RECIPES.glob("*-search.yml")), ids=lambda p: p.name)
def test_every_example_spec_goes_round_the_form(path):
    if spec_kind(path) == "merge":
        spec = load_spec(path)
        again = spec_from_dict(sf.merge_form_dict(sf.merge_form_from_spec(spec)), source=spec.source)
    else:
        spec = load_quant_search_spec(path)
        again = quant_search_spec_from_dict(sf.quant_form_dict(sf.quant_form_from_spec(spec)), source=spec.source)
    assert again == spec


def test_lm_eval_options_and_the_grid_switch_go_round_the_form(tmp_path):
    (tmp_path / "tasks").mkdir()
    data = {"models": ["a", "b"], "merge_method": "linear", "evolve": {"weight": [0.0, 1.0]},
            "objective": [{"task": "lm_eval:my_task"}], "report_tasks": ["lm_eval:other"], "grid_baseline": False,
            "lm_eval": {"include_path": [str(tmp_path / "tasks")], "seed": 7, "search_docs": 30, "heldout_docs": 40,
                        "num_fewshot": 2, "chat_template": True}}
    spec = spec_from_dict(data)
    form = sf.merge_form_from_spec(spec)
    assert form.lm_eval_seed == "7" and form.lm_eval_chat_template and not form.grid_baseline
    assert spec_from_dict(sf.merge_form_dict(form)) == spec
    bad = dataclasses.replace(form, lm_eval_seed="x")
    assert sf.check_merge_form(bad, check_files=False)[1].field == "lm_eval_seed"
    q = quant_search_spec_from_dict({"kind": "quantization", "model": "m", "options": {"formats": [{"bits": 2, "group_size": 64}],
                                     "ranks": [0]}, "targets": [2.5], "fitness": {"task": "lm_eval:my_task"},
                                     "lm_eval": {"include_path": [str(tmp_path / "tasks")], "seed": 3}})
    assert quant_search_spec_from_dict(sf.quant_form_dict(sf.quant_form_from_spec(q))) == q
    bad = dataclasses.replace(sf.quant_form_from_spec(q), lm_eval_search_docs="0")
    assert sf.check_quant_form(bad, check_files=False)[1].field == "lm_eval_search_docs"


def test_form_errors_name_the_field_the_checker_names():
    form = sf.MergeForm(name="x", base_model="base", models=["a", "b"], params=sf.default_params("ties"),
                        objective=[sf.ObjectiveRow("zoo-kl", "1")])
    assert sf.check_merge_form(form, check_files=False)[1] is None
    cases = [("generations", "0", "generations", "budget.generations: expected a positive integer, got 0"),
             ("granularity", "per_block", "granularity", "granularity: expected global, per_layer"),
             ("seed", "one", "seed", "seed: expected an integer, got 'one'")]
    for attr, value, field, text in cases:
        bad = dataclasses.replace(form, **{attr: value})
        spec, err = sf.check_merge_form(bad, check_files=False)
        assert spec is None and err.field == field and err.text.startswith(text), (attr, err)
    bad = dataclasses.replace(form, objective=[sf.ObjectiveRow("zoo-kl", "1"), sf.ObjectiveRow("zoo-kl", "-2")])
    assert sf.check_merge_form(bad, check_files=False)[1].field == "objective.1"
    rows = sf.default_params("ties")
    next(r for r in rows if r.name == "density").high = "3"
    err = sf.check_merge_form(dataclasses.replace(form, params=rows), check_files=False)[1]
    assert err.field == "evolve.density" and "leave the parameter's range" in err.text
    err = sf.check_merge_form(dataclasses.replace(form, objective=[sf.ObjectiveRow("no-such-task", "1")]))[1]
    assert err.field in ("base_model", "objective.0")  # models are checked before tasks
    q = sf.QuantForm(model="m", stages="2:4, 8:2")
    assert sf.check_quant_form(q, check_files=False)[1].field == "stages"
    assert sf.check_quant_form(dataclasses.replace(q, stages="2:4, 8:1", formats="ternary/64, 5/64"),
                               check_files=False)[1].field == "formats"


# --- the merge builder on screen --------------------------------------------------------------

def hand_written(env, name: str = "built") -> Path:
    data = {"name": name, "base_model": str(env.base), "models": [str(env.a), str(env.b)], "merge_method": "ties",
            "evolve": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}, "granularity": "per_layer",
            "fixed": {"normalize": True}, "objective": [{"task": str(env.task), "weight": 1.0}],
            "budget": {"generations": 2, "population": 2}, "seed": 3}
    path = env.tmp / "hand-search.yml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.asyncio
async def test_builder_composes_the_hand_written_spec_and_starts_it(env, tmp_path, monkeypatch):
    """Models added by path, base and sources picked, bounds and the objective typed: Save and start
    writes recipes/built-search.yml, equal to the hand-written spec, and runs it; the plots get the
    search's points and the report's entries."""
    monkeypatch.chdir(tmp_path)
    app = WorkbenchApp(env.config)
    async with app.run_test(size=SIZE) as pilot:
        search = app.screen
        await pilot.press("ctrl+e")
        await wait_until(pilot, lambda: isinstance(app.screen, MergeBuilderScreen), what="the builder")
        b = app.screen
        await pilot.pause()
        for model in (env.base, env.a, env.b):
            b.query_one("#b-add-model", Input).value = str(model)
            await click(pilot, "#b-add")
            await pilot.pause()
        assert {str(env.base), str(env.a), str(env.b)} <= set(b.known)
        b.query_one("#f-base_model", Select).value = str(env.base)
        sources = b.query_one("#f-models", SelectionList)
        sources.select(str(env.a))
        sources.select(str(env.b))
        b.query_one("#f-name", Input).value = "built"
        b.query_one("#p-density .p-low", Input).value = "0.2"
        b.query_one("#p-normalize .p-fixed", Input).value = "true"
        b.query_one("#f-granularity", Input).value = "per_layer"
        b.query_one("#o-0 .o-task", Input).value = str(env.task)
        b.query_one("#f-generations", Input).value = "2"
        b.query_one("#f-population", Input).value = "2"
        b.query_one("#f-seed", Input).value = "3"
        await pilot.pause()
        assert b.validate() is None, b.error
        assert not b.query(".field-error.-shown")
        await click(pilot, "#b-start")
        await wait_until(pilot, lambda: app.screen is search, what="the builder to close")
        saved = tmp_path / "recipes" / "built-search.yml"
        assert same(load_spec(saved), load_spec(hand_written(env)))
        assert search.query_one("#spec-path", Input).value == str(saved)
        await wait_until(pilot, lambda: search.phase == "finished", timeout=120, what="the built search")
        await app.workers.wait_for_complete()
        assert not notifications(app, "error")
        run_dir = search.run_dir
        assert json.loads((run_dir / "spec.yml").read_text())["name"] == "built"
        rows = read_history(run_dir)
        assert len(rows) == 2 * 3

        # the plots hold what the search scored: best/mean per generation, every candidate's score
        series = search.query_one("#fitness").plot.series
        gens = sorted({r["generation"] for r in rows})
        assert series["best"][0] == gens and series["mean"][0] == gens
        assert series["best"][1] == [max(r["score"] for r in rows if r["generation"] == g) for g in gens]
        assert sorted(zip(*series["candidates"])) == sorted((r["generation"], r["score"]) for r in rows)
        # the held-out report: a bar per model and task, the same entries as the table
        chart = search.query_one("#report-chart")
        report = json.loads((run_dir / "report.json").read_text())
        assert chart.models == [e["name"] for e in report["entries"]]
        assert set(chart.series) == set(report["tasks"])
        assert chart.series["tiny"] == [e["heldout"]["tiny"]["score"] for e in report["entries"]]
        heat = search.query_one("#heatmap")
        text = str(heat.render())
        assert "L0" in text and "weight" in text and "low" in text and "[0, 1]" in text


@pytest.mark.asyncio
async def test_opening_a_spec_fills_the_form_and_errors_show_at_their_field(env, tmp_path, monkeypatch):
    """The spec shown opens into the form (every field, and back to the same spec); then each
    checker error shows under the field it names, and Save is refused until the form checks."""
    monkeypatch.chdir(tmp_path)
    data = {"name": "opened", "base_model": str(env.base), "models": [str(env.b), str(env.a)],
            "merge_method": "dare_ties", "evolve": {"weight": [0.1, 0.9], "density": [0.3, 0.7]},
            "granularity": 2, "split_attention_mlp": True, "fixed": {"lambda": 1.5},
            "objective": [{"task": str(env.task), "weight": 2.0}, {"task": "zoo-kl", "weight": 0.5}],
            "report_tasks": ["zoo-perplexity"], "budget": {"generations": 3, "population": 4, "max_minutes": 2.5},
            "seed": 7, "limit": 5, "racing": True, "sigma0": 0.3}
    path = tmp_path / "opened-search.yml"
    path.write_text(yaml.safe_dump(data))
    app = WorkbenchApp(env.config)
    async with app.run_test(size=SIZE) as pilot:
        b = await merge_builder_on(app, pilot, path)
        await pilot.pause()
        assert b.query_one("#f-merge_method", Select).value == "dare_ties"
        assert b.query_one("#f-models", SelectionList).selected == [str(env.b), str(env.a)]
        assert b.query_one("#f-granularity", Input).value == "2"
        assert b.query_one("#f-split_attention_mlp", Checkbox).value is True
        assert b.query_one("#p-lambda .p-fixed", Input).value == "1.5"
        assert b.query_one("#o-1 .o-weight", Input).value == "0.5"
        assert b.query_one("#f-max_minutes", Input).value == "2.5"
        assert b.read() == sf.merge_form_from_spec(load_spec(path))
        assert same(spec_from_dict(sf.merge_form_dict(b.read())), load_spec(path))
        assert b.validate() is None

        def shown() -> dict[str, str]:
            return {lab.id: str(lab.render()) for lab in b.query(".field-error.-shown").results(Label)}

        assert shown() == {}
        b.query_one("#f-generations", Input).value = "0"
        await pilot.pause()
        assert shown() == {"e-generations": "budget.generations: expected a positive integer, got 0"}
        b.query_one("#f-generations", Input).value = "2"
        b.query_one("#p-density .p-high", Input).value = "1.5"
        await pilot.pause()
        assert list(shown()) == ["e-evolve-density"] and "leave the parameter's range" in shown()["e-evolve-density"]
        b.query_one("#p-density .p-high", Input).value = "1.0"
        b.query_one("#o-1 .o-task", Input).value = "no-such-task"
        await pilot.pause()
        assert list(shown()) == ["e-objective-1"] and "no such task" in shown()["e-objective-1"]
        await pilot.press("ctrl+s")  # refused: nothing written, the error named
        assert not (tmp_path / "recipes").exists()
        assert "no-such-task" in notifications(app, "error")[-1].message
        b.query_one("#o-1 .o-task", Input).value = "zoo-kl"
        b.query_one("#f-merge_method", Select).value = "slerp"  # one source besides the base, and t
        await wait_until(pilot, lambda: b.method_shown == "slerp", what="slerp's parameters")
        await pilot.pause()
        assert list(shown()) == ["e-models"] and "slerp takes 1..1 models" in shown()["e-models"]
        b.query_one("#f-models", SelectionList).deselect(str(env.a))
        await pilot.pause()
        assert b.param_names == ["t"] and b.validate() is None  # t evolves over [0, 1] by default
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: not isinstance(app.screen, MergeBuilderScreen), what="the save")
        saved = load_spec(tmp_path / "recipes" / "opened-search.yml")
        assert saved.merge_method == "slerp" and saved.models == [str(env.b)] and saved.evolve == {"t": (0.0, 1.0)}
        assert app.screen.phase == "idle"  # saved, not started


# --- the quantization builder -----------------------------------------------------------------

@pytest.mark.asyncio
async def test_quant_builder_opens_checks_saves_and_starts(env, tmp_path, monkeypatch):
    from conftest import write_quant_inputs
    from workbench.tui.screens.quant_search import QuantSearchScreen

    monkeypatch.setenv("WORKBENCH_KERNELS", "0")  # no kernel build in this fresh home: the form is tested here
    _, task, _ = write_quant_inputs(tmp_path)
    spec = tmp_path / "tiny-quant-search.yml"
    spec.write_text(yaml.safe_dump({
        "kind": "quantization", "name": "tiny-q", "model": str(env.base), "targets": [5.0, 7.0], "seq_len": 32,
        "options": {"formats": [{"bits": 1.58, "group_size": 16}, {"bits": 4, "group_size": 16}], "ranks": [0]},
        "stages": [{"windows": 1, "keep": 1}], "budget": {"generations": 1, "offspring": 2},
        "heldout_windows": 2, "heldout_task": str(task)}))
    app = WorkbenchApp(env.config)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f7")
        screen = app.screen
        assert isinstance(screen, QuantSearchScreen)
        screen.query_one("#qs-spec", Input).value = str(spec)
        screen.query_one("#qs-run", Input).value = str(tmp_path / "qrun")
        await pilot.press("ctrl+e")
        await wait_until(pilot, lambda: isinstance(app.screen, QuantBuilderScreen), what="the builder")
        b = app.screen
        await pilot.pause()
        assert b.read() == sf.quant_form_from_spec(load_quant_search_spec(spec))
        assert b.query_one("#f-formats", Input).value == "ternary/16, 4/16"
        assert b.validate() is None
        b.query_one("#f-targets", Input).value = "5, 40"
        await pilot.pause()
        assert "targets" in str(b.query_one("#e-targets", Label).render())
        assert b.query_one("#e-targets").has_class("-shown")
        b.query_one("#f-targets", Input).value = "6.0"
        b.query_one("#f-name", Input).value = "tiny-q2"
        out = tmp_path / "built-quant-search.yml"
        b.query_one("#b-save-path", Input).value = str(out)
        await pilot.pause()
        await click(pilot, "#b-start")
        await wait_until(pilot, lambda: app.screen is screen, what="the builder to close")
        built = load_quant_search_spec(out)
        assert same(built, dataclasses.replace(load_quant_search_spec(spec), name="tiny-q2", targets=[6.0]))
        await wait_until(pilot, lambda: not screen.running and (tmp_path / "qrun" / "pareto.json").is_file(),
                         timeout=120, what="the built quantization search")
        await app.workers.wait_for_complete()
        assert json.loads((tmp_path / "qrun" / "spec.yml").read_text())["name"] == "tiny-q2"
        assert not notifications(app, "error")


@pytest.mark.asyncio
async def test_a_spec_of_the_other_kind_opens_in_the_builder_of_its_kind(env, tmp_path, monkeypatch):
    """A quantization spec opened in the merge builder goes to the quantization builder, on the Quant
    search screen that runs it, filled from the spec; a merge spec opened there comes back."""
    from workbench.tui.screens.quant_search import QuantSearchScreen
    from workbench.tui.screens.search import SearchScreen

    monkeypatch.setenv("WORKBENCH_KERNELS", "0")
    quant, merge = RECIPES / "smollm2-quant-short-search.yml", RECIPES / "zoo-quick-search.yml"
    app = WorkbenchApp(env.config)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+e")
        await wait_until(pilot, lambda: isinstance(app.screen, MergeBuilderScreen), what="the merge builder")
        app.screen.query_one("#b-open-path", Input).value = str(quant)
        await click(pilot, "#b-open")
        await wait_until(pilot, lambda: isinstance(app.screen, QuantBuilderScreen), what="the quantization builder")
        await pilot.pause()
        assert isinstance(app.screen_stack[-2], QuantSearchScreen)
        assert app.screen.read() == sf.quant_form_from_spec(load_quant_search_spec(quant))
        app.screen.query_one("#b-open-path", Input).value = str(merge)
        await click(pilot, "#b-open")
        await wait_until(pilot, lambda: isinstance(app.screen, MergeBuilderScreen), what="the merge builder again")
        await pilot.pause()
        assert isinstance(app.screen_stack[-2], SearchScreen)
        assert app.screen.read() == sf.merge_form_from_spec(load_spec(merge))
        # a quantization spec named on Search: ctrl+e opens it in the quantization builder at once
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, SearchScreen), what="Search")
        app.screen.query_one("#spec-path", Input).value = str(quant)
        await pilot.press("ctrl+e")
        await wait_until(pilot, lambda: isinstance(app.screen, QuantBuilderScreen), what="the quantization builder")
        assert not notifications(app, "error")


@pytest.mark.asyncio
async def test_lm_eval_tasks_are_checked_at_their_field_off_the_ui_thread(env, tmp_path, monkeypatch):
    """An lm_eval:NAME objective is loaded through lm-eval in a worker; one that does not load shows
    lm-eval's reason under its field and Save is refused; a task that loads clears it."""
    pytest.importorskip("lm_eval")
    from test_lm_eval_tasks import write_tasks

    monkeypatch.chdir(tmp_path)
    include = write_tasks(tmp_path)
    data = {"name": "lm", "base_model": str(env.base), "models": [str(env.b), str(env.a)], "merge_method": "linear",
            "evolve": {"weight": [0.1, 0.9]}, "objective": [{"task": "lm_eval:toy_mc"}],
            "lm_eval": {"include_path": [str(include)]}, "budget": {"generations": 1, "population": 2}}
    path = tmp_path / "lm-search.yml"
    path.write_text(yaml.safe_dump(data))
    app = WorkbenchApp(env.config)
    async with app.run_test(size=SIZE) as pilot:
        b = await merge_builder_on(app, pilot, path)
        await wait_until(pilot, lambda: b.lm_eval_checked and not b.lm_eval_pending(), what="the lm-eval check")
        assert b.validate() is None
        b.query_one("#o-0 .o-task", Input).value = "lm_eval:toy_mcq"
        await wait_until(pilot, lambda: len(b.lm_eval_checked) == 2 and not b.lm_eval_pending(), timeout=60,
                         what="the second lm-eval check")
        error = b.validate()
        assert error is not None and error.field == "objective.0" and "no lm-eval task 'toy_mcq'" in error.text
        assert "no lm-eval task 'toy_mcq'" in str(b.query_one("#e-objective-0", Label).render())
        await pilot.press("ctrl+s")
        assert not (tmp_path / "recipes").exists()
        b.query_one("#o-0 .o-task", Input).value = "lm_eval:toy_gen"
        await wait_until(pilot, lambda: len(b.lm_eval_checked) == 3 and not b.lm_eval_pending(), what="the third")
        assert b.validate() is None
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: not isinstance(app.screen, MergeBuilderScreen), what="the save")
        assert load_spec(tmp_path / "recipes" / "lm-search.yml").objective[0].task == "lm_eval:toy_gen"
