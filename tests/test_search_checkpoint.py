"""Search checkpoints load without running code from the run directory (no arbitrary pickle)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from test_search import DistanceObjective, linear_spec, state
from workbench.errors import WorkbenchError
from workbench.search.checkpoint import CHECKPOINT, cma_file_name
from workbench.search.run import Search, open_search, read_history
from workbench.search.spec import spec_from_dict

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import cma

MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"workbench-pwned-{os.getpid()}"


class Shell:
    """Unpickling this runs a shell command that creates MARKER."""

    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


class Exec:
    def __reduce__(self):
        return exec, (f"open({str(MARKER)!r}, 'w').close()",)


class Escape:
    """getattr, which pickle uses for bound methods, aimed at a dunder."""

    def __reduce__(self):
        return getattr, (np.random.RandomState(0), "__reduce__")


class CallsCma:
    """An allowed cma class called (REDUCE) instead of rebuilt: its __init__ would write logs."""

    def __reduce__(self):
        return cma.CMAEvolutionStrategy, ([0.5, 0.5], 0.3, {"verb_log": 1, "verb_filenameprefix": str(MARKER) + "/"})


class BitGenerator:
    """numpy's RNG rebuilder calls any class it is given."""

    def __reduce__(self):
        return getattr(np.random._pickle, "__bit_generator_ctor"), (cma.logger.CMADataLogger,)


class RandomStateCtor:
    def __reduce__(self):
        return getattr(np.random._pickle, "__randomstate_ctor"), ("MT19937", cma.CMAEvolutionStrategy)


class RangeOf:
    def __reduce__(self):
        return range, (cma.utilities.utils.BlancClass(),)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two tiny models, their spec and objective, and a run of 2 generations (copied per test)."""
    from conftest import save_tiny_model

    root = tmp_path_factory.mktemp("ckpt")
    base = save_tiny_model(root / "a", "llama", seed=0)
    b = save_tiny_model(root / "b", "llama", seed=1, base=base)
    A, B = state(base), state(b)
    target = {k: 0.6 * A[k] + 0.4 * B[k] for k in A}
    spec = spec_from_dict(linear_spec([base, b], budget={"generations": 3, "population": 4}))
    s = Search(spec, root / "run", objective=DistanceObjective(target)).start()
    s.step()
    s.step()
    return spec, target, root / "run"


@pytest.fixture
def run(made, tmp_path) -> Path:
    MARKER.unlink(missing_ok=True)
    yield shutil.copytree(made[2], tmp_path / "run")
    MARKER.unlink(missing_ok=True)


def resume(made, run_dir: Path) -> Search:
    spec, target, _ = made
    return Search(spec, run_dir, objective=DistanceObjective(target)).resume()


def plant(run_dir: Path, blob: bytes) -> Path:
    """Put ``blob`` where the checkpoint's CMA state is read, with a matching checksum (whoever
    crafts a run directory writes both files)."""
    record = json.loads((run_dir / CHECKPOINT).read_text())
    path = run_dir / record["cma_state"]
    path.write_bytes(blob)
    record["cma_sha256"] = hashlib.sha256(blob).hexdigest()
    (run_dir / CHECKPOINT).write_text(json.dumps(record))
    return path


def real_es(run_dir: Path):
    record = json.loads((run_dir / CHECKPOINT).read_text())
    return pickle.loads((run_dir / record["cma_state"]).read_bytes())  # the test's own file


def test_checkpoint_is_json_and_one_cma_state(run):
    record = json.loads((run / CHECKPOINT).read_text())
    assert record["generation"] == 2 and record["evaluations"] == 2 * 5
    assert record["incumbent"]["score"] == max(r["score"] for r in read_history(run))
    assert len(record["numpy_rng"]["keys"]) == 624
    assert {p.name for p in run.glob("checkpoint*")} == {CHECKPOINT, cma_file_name(2)}


def _with(attr_path: str, value):
    def change(es):
        obj, *names = attr_path.split(".")
        target = es
        for n in names[:-1]:
            target = getattr(target, n)
        setattr(target, names[-1], value)
        return es
    return change


@pytest.mark.parametrize("payload,words", [
    (lambda es: Shell(), f"{os.system.__module__}.system"),
    (lambda es: Exec(), "builtins.exec"),
    (lambda es: Escape(), "'__reduce__'"),
    (lambda es: CallsCma(), "a call of cma.evolution_strategy.CMAEvolutionStrategy"),
    (lambda es: BitGenerator(), "a bit generator cma.logger.CMADataLogger"),
    (lambda es: RandomStateCtor(), "a call of cma.evolution_strategy.CMAEvolutionStrategy"),
    (lambda es: RangeOf(), "range() of cma.utilities.utils.BlancClass"),
    (lambda es: {"es": es, "x": Shell()}, f"{os.system.__module__}.system"),  # the call buried inside real state
    (_with("es.sm.eigenmethod", cma.CMAEvolutionStrategy), "es.sm.eigenmethod"),  # a class where pycma calls
    (lambda es: (es.opts.__setitem__("verb_log", 1), es)[1], "option verb_log=1"),  # pycma would write logs
    (lambda es: np.arange(3), "instead of a cma.CMAEvolutionStrategy"),
])
def test_crafted_cma_state_cannot_run_code(made, run, payload, words):
    path = plant(run, pickle.dumps(payload(real_es(run))))
    with pytest.raises(WorkbenchError) as e:
        resume(made, run)
    msg = str(e.value)
    assert msg.startswith(f"{path}: refusing to load") and words in msg and "\n" not in msg
    assert not MARKER.exists()


def test_garbled_or_mismatched_cma_state_is_one_line(made, run):
    path = plant(run, pickle.dumps(real_es(run))[:-40])  # cut short
    with pytest.raises(WorkbenchError, match="unreadable CMA-ES state"):
        resume(made, run)
    path.write_bytes(b"not the file the checkpoint names")
    with pytest.raises(WorkbenchError, match="not the CMA-ES state that checkpoint.json names"):
        resume(made, run)


def test_old_pickle_checkpoint_is_refused_unread(made, run, capsys):
    from workbench.cli import main
    from workbench.tui.runs import summarize_run

    for p in run.glob("checkpoint*"):
        p.unlink()
    (run / "checkpoint.pkl").write_bytes(pickle.dumps({"es": Shell(), "state": Shell()}))
    with pytest.raises(WorkbenchError, match="older workbench version .* cannot be resumed safely"):
        open_search(None, run, resume=True, objective=DistanceObjective(made[1]))
    assert main(["search", "--resume", str(run), "--no-progress", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pkl: written by an older workbench version" in err
    assert summarize_run(run).status == "old checkpoint"
    assert not MARKER.exists()


def test_kill_between_cma_state_and_json_resumes_exactly(made, run, tmp_path):
    """A kill after generation 3's CMA file but before its checkpoint.json (and after some of its
    history rows): the resume goes on from generation 2 and equals an uninterrupted run."""
    spec, target, _ = made
    full = Search(spec, tmp_path / "full", objective=DistanceObjective(target)).start()
    full.run()
    (run / cma_file_name(3)).write_bytes(b"half")
    with open(run / "history.jsonl", "a") as f:
        f.write(json.dumps(read_history(tmp_path / "full")[2 * 5]) + "\n")
    np.random.seed(7)
    resume(made, run).run()
    keep = ("generation", "index", "kind", "genome", "score")
    assert [{k: r[k] for k in keep} for r in read_history(run)] == \
        [{k: r[k] for k in keep} for r in read_history(tmp_path / "full")]
    assert {p.name for p in run.glob("checkpoint*")} == {CHECKPOINT, cma_file_name(3)}


def test_export_skips_a_half_written_last_row(run, tmp_path):
    """A kill -9 leaves half a row at the end of history.jsonl; `recipe export` reads the history
    as the UI does and exports the best complete row."""
    import yaml

    from workbench.cli import main

    rows = read_history(run)
    best = max((r for r in rows if r["score"] is not None), key=lambda r: r["score"])
    with open(run / "history.jsonl", "a") as f:
        f.write('{"generation": 2, "index": 0, "score": 0.9999, "recipe": {"merge_met')
    assert main(["recipe", "export", str(run), str(tmp_path / "best.yml")]) == 0
    text = (tmp_path / "best.yml").read_text()
    assert f"generation {best['generation']} candidate {best['index']}" in text.splitlines()[0]
    got = yaml.safe_load(text)
    assert [m["parameters"] for m in got["models"]] == [m["parameters"] for m in best["recipe"]["models"]]
