"""Parallel and distributed search workers: their devices, dead workers replaced, errors reaching the
history, and the held-out report computed by the workers themselves."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import VOCAB, save_tiny_model, tiny_tokenizer, write_tiny_task
from test_search import DistanceObjective, linear_spec, state
from workbench.errors import WorkbenchError
from workbench.search.backends import process_devices, ray_plan
from workbench.search.report import heldout_report
from workbench.search.run import Search, read_history
from workbench.search.spec import spec_from_dict

KEEP = ("generation", "index", "kind", "genome", "score", "error")


def _rows(run) -> list[dict]:
    return [{k: r[k] for k in KEEP} for r in read_history(run)]


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: this process sees ``n`` CUDA devices (0: none)."""

    def see(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return see


def test_process_workers_spread_over_the_visible_gpus(gpus):
    gpus(3)
    assert process_devices("cuda") == ["cuda:0", "cuda:1", "cuda:2"]        # one per GPU by default
    assert process_devices("auto", 5) == ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1"]
    assert process_devices("cuda:2", 2) == ["cuda:2", "cuda:2"]             # a named GPU pins them all
    assert process_devices("cpu") == ["cpu", "cpu"] and process_devices("cpu", 3) == ["cpu"] * 3
    with pytest.raises(WorkbenchError, match=r"^--device cuda:3: this machine has 3 CUDA device"):
        process_devices("cuda:3")
    with pytest.raises(WorkbenchError, match=r"^--workers 0: expected a positive number"):
        process_devices("cuda", 0)
    gpus(0)
    assert process_devices("auto") == ["cpu", "cpu"]
    with pytest.raises(WorkbenchError, match=r"^--device cuda: CUDA is not available here"):
        process_devices("cuda")


def test_ray_actors_follow_the_cluster_gpus():
    four = {"CPU": 32.0, "GPU": 4.0}
    assert ray_plan("cuda", None, four) == (4, 1, "cuda:0")
    assert ray_plan("cuda:3", None, four) == (4, 1, "cuda:0")   # each actor sees its one GPU as cuda:0
    assert ray_plan("auto", 2, four) == (2, 1, "cuda:0")
    assert ray_plan("cpu", None, four) == (2, 0, "cpu") and ray_plan("cpu", 5, four) == (5, 0, "cpu")
    assert ray_plan("auto", None, {"CPU": 8.0}) == (2, 0, "cpu") and ray_plan("auto", 3, {"CPU": 8.0}) == (3, 0, "cpu")
    with pytest.raises(WorkbenchError, match=r"^--device cuda: the Ray cluster has no GPUs"):
        ray_plan("cuda", None, {"CPU": 8.0})
    with pytest.raises(WorkbenchError, match=r"^--workers 5: the Ray cluster has 4 GPU\(s\)"):
        ray_plan("cuda", 5, four)
    with pytest.raises(WorkbenchError, match=r"^--device tpu: expected cpu, cuda, cuda:N or auto"):
        ray_plan("tpu", None, four)


class Died(Exception):
    """A worker's death, as a backend tells it (RayActorError, BrokenProcessPool)."""


def test_a_dead_workers_call_runs_again_once_then_is_one_line():
    from concurrent.futures import ThreadPoolExecutor

    from workbench.search.backends import run_in_order

    calls = [("evaluate", (([0.5], 0, i, "candidate", None),)) for i in range(5)]   # (method, its arguments)
    ran = []

    def dispatch(workers, dies):
        def submit(worker, method, args):
            def work():
                i = args[0][2]
                ran.append((worker, i))
                if dies(worker, i):
                    raise Died(f"{worker} died on {i}\n(the rest of a long message)")
                if i == 4 and worker == "bug":
                    raise ValueError("not a death")
                return {"index": i, "by": worker}
            return pool.submit(work)

        def replace(worker, error):
            return worker + "'" if isinstance(error, Died) else None

        return run_in_order(calls, workers, submit, replace, "--backend test")

    with ThreadPoolExecutor(2) as pool:
        workers = ["a", "b"]
        out = list(dispatch(workers, lambda w, i: w == "a" and i == 0))   # a dies once, on call 0
        assert [r["index"] for r in out] == list(range(5))                # in order, each once
        assert workers == ["a'", "b"] and ("a", 0) in ran and out[0]["by"] != "a"
        assert sorted(i for w, i in ran if w != "a") == list(range(5))
        workers = ["a"]
        with pytest.raises(WorkbenchError, match=r"^--backend test: a worker died twice running generation 0 "
                                                 r"candidate 0: a' died on 0$"):
            list(dispatch(workers, lambda w, i: True))
        with pytest.raises(ValueError, match="not a death"):
            list(dispatch(["bug"], lambda w, i: False))


@pytest.fixture
def task_search(tiny_models, tmp_path, monkeypatch):
    """(spec with a real task, a finished local search with its report): the reference for the others."""
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    base, a, b = tiny_models("llama", 3)
    task = write_tiny_task(tmp_path / "tiny.yml")
    spec = spec_from_dict({"name": "w", "base_model": str(base), "models": [str(a), str(b)], "merge_method": "ties",
                           "evolve": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}, "fixed": {"normalize": True},
                           "objective": [{"task": str(task)}], "budget": {"generations": 2, "population": 3},
                           "seed": 1, "eval_dtype": "float32"})
    local = Search(spec, tmp_path / "local").start()
    local.run()
    report = heldout_report(local)
    local.close()
    return spec, report


def _count_source_loads(monkeypatch) -> list:
    """Each InMemoryMerger built in this process (the sources loaded) appends to the list."""
    from workbench.search.candidates import InMemoryMerger

    loads, init = [], InMemoryMerger.__init__

    def counted(self, *a, **k):
        loads.append(1)
        init(self, *a, **k)

    monkeypatch.setattr(InMemoryMerger, "__init__", counted)
    return loads


def _report_scores(report: dict) -> list:
    return [(e["name"], e["search_score"], e["heldout"]) for e in report["entries"]]


def test_process_workers_run_the_search_and_the_report(task_search, tmp_path, monkeypatch):
    spec, local_report = task_search
    loads = _count_source_loads(monkeypatch)
    search = Search(spec, tmp_path / "procs", backend="processes").start()
    try:
        assert search.backend.devices == ["cpu", "cpu"]               # --workers not given, CPU: two
        where = list(search.backend.call("where", [()] * 4))
        assert {w["device"] for w in where} == {"cpu"} and len({w["pid"] for w in where}) == 2
        assert os.getpid() not in {w["pid"] for w in where}
        search.run()
        report = heldout_report(search)
    finally:
        search.close()
    assert loads == []                                 # the driver never loaded the sources
    assert _rows(tmp_path / "procs") == _rows(tmp_path / "local")
    assert _report_scores(report) == _report_scores(local_report)   # the same scores, exactly
    assert report["grid"] == local_report["grid"]
    assert json.loads((tmp_path / "procs" / "report.json").read_text())["entries"] == report["entries"]


# --- Ray: one local cluster for the tests below (started by the first RayBackend, ~10 s) -------------
class FailingObjective:
    """Raises on every candidate, naming the process it ran in."""

    def __call__(self, model, tokenizer, incumbent=None):
        raise RuntimeError(f"the objective broke in process {os.getpid()}")


def test_ray_replaces_a_dead_actor_and_its_actors_score_the_report(task_search, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    spec, local_report = task_search
    loads = _count_source_loads(monkeypatch)
    search = Search(spec, tmp_path / "ray", backend="ray", workers=2).start()
    killed = []

    def kill_one(event) -> None:   # mid-generation: the actor may be running a candidate or idle
        if not killed:
            killed.append(search.backend.actors[0])
            ray.kill(killed[0])

    try:
        search.run(on_candidate=kill_one)
        assert killed and all(a is not killed[0] for a in search.backend.actors) and len(search.backend.actors) == 2
        report = heldout_report(search)
    finally:
        search.close()
    rows = read_history(tmp_path / "ray")
    assert sorted((r["generation"], r["index"]) for r in rows) == [(g, i) for g in range(2) for i in range(4)]
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "local")       # every candidate once, the same scores
    assert loads == [] and _report_scores(report) == _report_scores(local_report)


def test_ray_actor_errors_reach_the_history_and_the_log(tiny_models, tmp_path, capfd):
    pytest.importorskip("ray")
    a, b = tiny_models("llama", 2)
    spec = spec_from_dict(linear_spec([a, b], budget={"generations": 1, "population": 2}))
    search = Search(spec, tmp_path / "ray", objective=FailingObjective(), backend="ray", workers=2).start()
    try:
        search.run()
        pids = {w["pid"] for w in search.backend.call("where", [()] * 2)}
    finally:
        search.close()
    rows = read_history(tmp_path / "ray")
    assert len(rows) == 3 and all(r["score"] is None for r in rows)
    errors = {r["error"] for r in rows}
    assert errors <= {f"RuntimeError: the objective broke in process {p}" for p in pids} and os.getpid() not in pids
    # the actors' tracebacks are streamed to the driver's log (asynchronously)
    import time

    seen = ""
    for _ in range(50):
        seen += capfd.readouterr().err
        if "Traceback" in seen and "the objective broke in process" in seen:
            break
        time.sleep(0.2)
    assert "Traceback" in seen and "the objective broke in process" in seen
    # an actor that cannot start (a source missing on its node) is one line, at once
    from workbench.search.backends import RayBackend

    missing = spec_from_dict(linear_spec([a, tmp_path / "not-on-this-node"]))
    backend = RayBackend(missing, 4, FailingObjective(), "cpu", 1)
    try:
        with pytest.raises(WorkbenchError, match=r"^--backend ray: a worker could not start: .*not-on-this-node"):
            list(backend.map([([0.5], 0, 0, "candidate", None)]))
    finally:
        backend.close()


def test_ray_backend_starts_one_actor_per_cluster_gpu(tiny_models, monkeypatch):
    ray = pytest.importorskip("ray")
    from workbench.search.backends import RayBackend

    a, b = tiny_models("llama", 2)
    spec = spec_from_dict(linear_spec([a, b]))
    RayBackend(spec, 4, DistanceObjective({}), "cpu", 1).close()   # the cluster is up before it is mocked
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 3.0})
    backend = RayBackend(spec, 4, DistanceObjective({}), "auto", None)   # the actors wait for GPUs: never run
    try:
        assert len(backend.actors) == 3 and backend.devices == ["cuda:0"] * 3
    finally:
        backend.close()


# --- the kl teacher on the worker's device ------------------------------------------------------
def _kl_task(tmp_path, ref):
    words = [f"w{i}" for i in range(3, VOCAB)]
    (tmp_path / "kl.jsonl").write_text("".join(json.dumps({"split": s, "text": " ".join(words[i::5])}) + "\n"
                                               for i, s in enumerate(["search", "search", "heldout"])))
    (tmp_path / "kl.yml").write_text(f"name: tiny-kl\ntype: kl\nitems: kl.jsonl\nmax_length: 16\nstride: 16\n"
                                     f"reference: {ref}\ntop_k: 8\n")
    return tmp_path / "kl.yml"


def test_kl_teacher_runs_beside_a_gpu_model_in_the_search_dtype_and_is_cached_apart(tmp_path, monkeypatch):
    from workbench.eval import kl
    from workbench.eval.evaluator import evaluate
    from workbench.eval.requests import prepare
    from workbench.eval.taskfile import load_task
    from workbench.models.loader import load_model

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    ref = save_tiny_model(tmp_path / "ref", seed=0)
    student, _ = load_model(save_tiny_model(tmp_path / "student", seed=1, base=ref, delta_scale=0.2))
    tok = tiny_tokenizer()
    task = load_task(_kl_task(tmp_path, ref))
    prep = prepare(task, "search", tok)
    assert kl.teacher_placement(torch.device("cpu"), "bfloat16") == (None, "float32")    # CPU: as `workbench eval`
    assert kl.teacher_placement(torch.device("cuda", 1), "bfloat16") == (torch.device("cuda", 1), "bfloat16")
    assert kl.teacher_placement(torch.device("cuda", 0)) == (torch.device("cuda", 0), "float32")
    plain = evaluate(student, tok, task, teacher_dtype="bfloat16")["tiny-kl"].metrics["kl"]   # CPU: float32 teacher
    theirs = kl.teacher_topk(task, prep, tok)
    assert plain == evaluate(student, tok, task)["tiny-kl"].metrics["kl"]
    # a worker whose teacher runs in bfloat16 (as beside a GPU model with eval_dtype bfloat16)
    monkeypatch.setattr(kl, "teacher_placement", lambda device, dtype=None: (device, dtype or "float32"))
    half = evaluate(student, tok, task, teacher_dtype="bfloat16")["tiny-kl"].metrics["kl"]
    bf16 = kl.teacher_topk(task, prep, tok, device=torch.device("cpu"), dtype="bfloat16")
    assert not torch.equal(bf16["logprobs"], theirs["logprobs"])
    assert half != plain and half == pytest.approx(plain, rel=0.05)   # the teacher rounded to bfloat16
    assert evaluate(student, tok, task)["tiny-kl"].metrics["kl"] == plain                 # float32 still cached
    assert len(list((tmp_path / "home" / "eval-cache" / "kl").glob("*.safetensors"))) == 2   # cached apart
