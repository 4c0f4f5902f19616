"""The first run on an empty home (issue 18), driven by Pilot: the welcome names the keys; one
keystroke starts a live search that needs no zoo (seeded variants, scored by KL and perplexity)
and offers the zoo's build; the build's progress shows; its quick search starts when it is done.
The zoo build is a tiny builder that really trains two tiny experts, given through FirstRun."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

pytest.importorskip("textual")
pytest.importorskip("pytest_asyncio")

from textual.widgets import Input

from test_tui import SIZE, notifications, wait_until
from workbench.progress import emit
from workbench.search.run import read_history
from workbench.search.spec import spec_from_dict
from workbench.tui.app import WorkbenchApp
from workbench.tui.config import TuiConfig
from workbench.tui.first_run import WELCOME_MARK, FirstRun, mark_welcomed, should_welcome
from workbench.tui.screens.confirm import ConfirmScreen
from workbench.tui.screens.search import SearchScreen
from workbench.tui.screens.welcome import WelcomeScreen

STEPS = 3


def write_text_tasks(d: Path, reference: Path) -> tuple[Path, Path]:
    """A KL task (to ``reference``) and a perplexity task over tiny-vocabulary text."""
    text = lambda k: " ".join(f"w{3 + (i * k) % 90}" for i in range(40))  # noqa: E731
    for name, kind, extra in (("tiny-kl", "kl", f"reference: {reference}\ntop_k: 8\n"), ("tiny-ppl", "perplexity", "")):
        (d / f"{name}.jsonl").write_text("".join(json.dumps({"split": s, "text": text(k)}) + "\n"
                                                 for s, k in (("search", 7), ("heldout", 11))))
        (d / f"{name}.yml").write_text(f"name: {name}\ntype: {kind}\nitems: {name}.jsonl\nmax_length: 32\n{extra}")
    return d / "tiny-kl.yml", d / "tiny-ppl.yml"


def spec_file(path: Path, name: str, base: Path, models: list[Path], tasks: list[Path]) -> Path:
    data = {"name": name, "base_model": str(base), "models": [str(m) for m in models], "merge_method": "ties",
            "evolve": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}, "fixed": {"normalize": True},
            "objective": [{"task": str(t)} for t in tasks], "budget": {"generations": 1, "population": 2}, "seed": 0}
    spec_from_dict(data)  # a spec the checker takes
    path.write_text(yaml.safe_dump(data))
    return path


class TinyZoo:
    """Stands in for the default zoo: two experts really trained from a tiny model (zoo.train.train)."""

    def __init__(self, d: Path, base: Path, task: Path) -> None:
        self.d, self.base, self.task = d, base, task
        self.experts = [d / "zoo" / f"tiny-expert-{i}" for i in (1, 2)]
        self.events: list[tuple[str, int | None, int | None]] = []

    def build(self, progress) -> list[Path]:
        from workbench.models.loader import load_model
        from workbench.zoo.train import TrainConfig, train

        def report(ev) -> None:
            self.events.append((ev.stage, ev.done, ev.total))
            progress(ev)

        for i, out in enumerate(self.experts):
            model, tok = load_model(self.base)
            pairs = [(f"w{a} w{a}", f"w{a + 1 + i}") for a in range(3, 3 + STEPS * 4)]
            cfg = TrainConfig(steps=STEPS, batch_size=4, lr=1e-2, warmup_steps=0, seed=i, chat_template=False,
                              checkpoint_every=100)
            result = train(model, tok, pairs, cfg, on_step=lambda s, n, loss, name=out.name:
                           emit(report, name, s, n, f"loss {loss:.4f}", loss))
            assert result.steps == STEPS
            model.save_pretrained(out)
            tok.save_pretrained(out)
        return self.experts

    def built(self) -> bool:
        return all((p / "config.json").is_file() for p in self.experts)

    def spec(self) -> Path:
        return spec_file(self.d / "tiny-zoo-quick-search.yml", "tiny-zoo-quick", self.base, self.experts, [self.task])


@pytest.mark.asyncio
async def test_first_run_on_an_empty_home(tiny_models, tmp_path, monkeypatch):
    from conftest import write_tiny_task
    from workbench.models.variants import ensure_variants

    home = tmp_path / "home"
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    (base,) = tiny_models("llama", 1)
    task = write_tiny_task(tmp_path / "tiny.yml")
    kl, ppl = write_text_tasks(tmp_path, base)
    zoo = TinyZoo(tmp_path, base, task)

    def no_zoo_spec(progress) -> Path:  # the default model's seeded variants, made by the same function
        emit(progress, "variants", 0, 2, "making them")
        variants = ensure_variants(base, ["variant-a", "variant-b"])
        return spec_file(tmp_path / "variants-search.yml", "tiny-variants", base, variants, [kl, ppl])

    first = FirstRun(build_zoo=zoo.build, zoo_built=zoo.built, zoo_spec=zoo.spec, no_zoo_spec=no_zoo_spec)
    config = TuiConfig(runs_dir=home / "runs")
    assert should_welcome(home, config.runs_dir)
    app = WorkbenchApp(config, first_run=first)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, WelcomeScreen), what="the welcome")
        console = Console(width=100, file=io.StringIO(), record=True)
        console.print(app.screen.query_one("#welcome-keys").content)
        text = console.export_text()
        for key in ("ctrl+r", "ctrl+e", "F1", "ctrl+p", "ctrl+q", "enter"):
            assert key in text, key
        await pilot.press("enter")  # one keystroke: the search over the variants starts, the zoo is offered
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the offer to build the zoo")
        assert (home / WELCOME_MARK).exists()
        await pilot.press("y")
        await wait_until(pilot, lambda: isinstance(app.screen, SearchScreen), what="the Search screen")
        screen = app.screen
        await wait_until(pilot, lambda: screen.run_dir is not None and screen.run_dir.name.startswith("tiny-zoo")
                         and screen.phase == "finished", timeout=120, what="the zoo's quick search after the build")
        variants_run = next(config.runs_dir.glob("variants-*"))
        assert (variants_run / "spec.yml").stat().st_mtime <= (screen.run_dir / "spec.yml").stat().st_mtime
        await app.workers.wait_for_complete()
        assert not notifications(app, "error"), [n.message for n in notifications(app, "error")]

        # the variants' search ran to its end, scored by KL and perplexity
        rows = read_history(variants_run)
        assert len(rows) == 3 and set(rows[0]["tasks"]) == {"tiny-kl", "tiny-ppl"}
        assert (variants_run / "report.json").is_file()
        # the zoo was really trained, its progress shown, and its quick search ran over the experts
        assert zoo.built() and [e for e in zoo.events if e[1] == STEPS] == [
            ("tiny-expert-1", STEPS, STEPS), ("tiny-expert-2", STEPS, STEPS)]
        job = screen.query_one("#zoo-job")
        assert job.has_class("-shown") and job.bar.total == STEPS and "zoo built" in str(job.label.render())
        quick = json.loads((screen.run_dir / "spec.yml").read_text())
        assert quick["name"] == "tiny-zoo-quick" and quick["models"] == [str(p) for p in zoo.experts]
        assert len(read_history(screen.run_dir)) == 3
        assert screen.query_one("#spec-path", Input).value == str(zoo.spec())

    # not shown again: the mark stays, and a home with runs is no first start either
    again = WorkbenchApp(config, first_run=first)
    async with again.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert isinstance(again.screen, SearchScreen)
        # with the zoo built, the keystroke starts its quick search directly
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: again.screen.run_dir is not None, what="the quick search")
        assert again.screen.run_dir.name.startswith("tiny-zoo-quick")
        await pilot.press("ctrl+b")
        await again.workers.wait_for_complete()
    (home / WELCOME_MARK).unlink()
    assert not should_welcome(home, config.runs_dir)  # runs exist
    mark_welcomed(tmp_path / "other")
    assert not should_welcome(tmp_path / "other", tmp_path / "none")
    assert should_welcome(tmp_path / "fresh", tmp_path / "none")


def test_the_no_zoo_spec_names_the_default_model_and_built_in_tasks():
    from workbench.eval.taskfile import resolve_task_path
    from workbench.ops.variants import VARIANTS, variant_spec_dict

    data = variant_spec_dict([f"SmolLM2-135M-Instruct-{v}" for v in VARIANTS], "SmolLM2-135M-Instruct")
    spec = spec_from_dict(data)
    assert [o.task for o in spec.objective] == ["zoo-kl", "zoo-perplexity"]
    for o in spec.objective:
        assert resolve_task_path(o.task).is_file()
    assert spec.base_model == "SmolLM2-135M-Instruct" and len(spec.models) == 2


@pytest.mark.asyncio
async def test_a_failing_first_search_is_a_notification(tmp_path, monkeypatch):
    """ctrl+r with no spec on an app with first-run steps: a failing preparation is one error line,
    the zoo offer declined, and the screen usable again (the next ctrl+r tries again)."""
    from workbench.errors import WorkbenchError

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    calls = []

    def no_zoo_spec(progress) -> Path:
        calls.append(1)
        raise WorkbenchError("SmolLM2-135M-Instruct: no GGUF to prepare it from")

    first = FirstRun(no_zoo_spec=no_zoo_spec, zoo_built=lambda: False, welcome=False)
    app = WorkbenchApp(TuiConfig(runs_dir=tmp_path / "runs"), first_run=first)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, SearchScreen)
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the zoo offer")
        await pilot.press("n")
        await wait_until(pilot, lambda: screen.phase == "failed", what="the failed preparation")
        assert notifications(app, "error")[-1].message == "SmolLM2-135M-Instruct: no GGUF to prepare it from"
        assert not screen.job_running("build zoo") and not screen.busy
        await pilot.press("ctrl+r")  # tried again; the zoo is not offered twice
        await wait_until(pilot, lambda: len(calls) == 2 and screen.phase == "failed", what="the second try")
        assert not isinstance(app.screen, ConfirmScreen)


def test_the_no_zoo_search_is_made_once_from_seeds_in_the_home(tmp_path, monkeypatch):
    """ops.variants on a home whose default model is a tiny stand-in: the variants are the seeded
    ones (the same bytes as make_variant with seeds 1 and 2), made once, and the spec names them."""
    from conftest import save_tiny_model
    from workbench.errors import WorkbenchError
    from workbench.models.variants import make_variant
    from workbench.ops.variants import ensure_default_variants, variant_search_spec
    from workbench.search.spec import load_spec

    home = tmp_path / "home"
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    base = save_tiny_model(home / "models" / "SmolLM2-135M-Instruct")
    events = []
    spec_path = variant_search_spec(progress=events.append)
    assert spec_path == home / "recipes" / "smollm2-variants-quick-search.yml"
    spec = load_spec(spec_path)
    assert spec.models == ["SmolLM2-135M-Instruct-variant-a", "SmolLM2-135M-Instruct-variant-b"]
    assert [o.task for o in spec.objective] == ["zoo-kl", "zoo-perplexity"]
    assert ("variants", 2, 2) in [(e.stage, e.done, e.total) for e in events]
    for seed, name in ((1, "variant-a"), (2, "variant-b")):
        again = make_variant(base, tmp_path / f"again-{seed}", seed=seed)
        made = base.with_name(f"{base.name}-{name}")
        assert (made / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    stamp = {p: p.stat().st_mtime_ns for p in home.rglob("*") if p.is_file()}
    assert variant_search_spec() == spec_path  # cached: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in home.rglob("*") if p.is_file()} == stamp
    with pytest.raises(WorkbenchError, match="seed"):
        ensure_default_variants(seed=5)
