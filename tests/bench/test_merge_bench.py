"""Side-by-side merge benchmark: `workbench merge` against mergekit 0.1.5 (`mergekit-yaml`).

Run by `make bench` (pytest -s). For each method one recipe (absolute paths, float32) over
the default model (SmolLM2-135M-Instruct) and two seeded variants is merged by both tools,
each as a child process, timed (wall clock) and measured for peak resident memory. The
outputs are compared tensor by tensor (exactly for deterministic methods, by statistics for
dare_ties, whose random masks differ between the tools). One JSON line is printed per figure:

    {"bench": "merge", "method": "ties", "tool": "workbench", "wall_s": ..., "peak_rss_mb": ...}
    {"bench": "merge", "method": "ties", "time_ratio": ..., "rss_ratio": ..., "max_abs_diff": ...}

Targets (asserted after all figures of a method are printed): max |ours - mergekit| <= 1e-5
for deterministic methods, and ours/mergekit <= 1/3 for both wall time and peak RSS. The
time target is only judged on quiet runs of both tools (see below); otherwise it fails as
inconclusive.

Peak RSS of a tool is the larger of (a) the kernel's high-water mark from os.wait4 (exact for
the tool and, as a max, for any descendant it reaped), taken by a tiny launcher process (see
LAUNCHER for why not by pytest itself), and (b) the sum of RSS over the tool's process tree,
sampled every 20 ms with psutil (which catches concurrent workers).
RSS includes pages of memory-mapped model files that were touched, for both tools alike.
Figures are in seconds and MiB. ``other_cpu_s`` is the CPU time the rest of the machine used
during a run (from /proc/stat): when it is large, the run competed for the CPUs (noise).

Environment knobs: BENCH_METHODS=ties,slerp (a subset), BENCH_REPEATS and BENCH_MAX_ATTEMPTS
(see below), BENCH_MODEL_DIR (the base model; default: `workbench models prepare-default`),
BENCH_MERGEKIT_YAML (path of mergekit-yaml), BENCH_TMPDIR (where outputs go; deleted after
each method), BENCH_NO_TARGETS=1 (print the figures; assert only that both tools ran).

The CPUs may be shared with other work. A run is "quiet" when the rest of the machine
used at most 0.1 CPU seconds per wall second meanwhile. Before each run the benchmark waits
(up to BENCH_QUIET_WAIT=30 seconds) for a quiet second; each tool is rerun (interleaved, up to
BENCH_MAX_ATTEMPTS=3 runs) until it has BENCH_REPEATS (default 1) quiet runs. The figures are
the least wall time among the quiet runs (among all, flagged "quiet": false, if none was) and
the largest peak RSS of all runs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil", reason="psutil comes with the bench extra: make bench")

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SEED = 0
MAX_ABS_DIFF = 1e-5
TIME_RATIO = 1 / 3
RSS_RATIO = 1 / 3
# dare_ties masks are random and drawn differently by the two tools: the statistics must agree
DARE_CHANGED_ABS_TOL = 0.005  # fraction of entries changed vs the base, absolute
DARE_MEAN_DELTA_REL_TOL = 0.05  # mean |out - base| over all entries, relative
# a run is quiet when the rest of the machine used at most this many CPU seconds per wall second
QUIET_FRACTION = 0.1
QUIET_WAIT_S = float(os.environ.get("BENCH_QUIET_WAIT", "30"))  # before each run, wait this long for quiet

# method -> whether it has a base model, whether its result is deterministic, the models (by role)
# with their parameters, and the global parameters
A, B = "variant-a", "variant-b"
METHODS: dict[str, dict] = {
    "ties": {"base": True, "deterministic": True,
             "models": [(A, {"weight": 0.6, "density": 0.5}), (B, {"weight": 0.4, "density": 0.5})],
             "parameters": {"normalize": True}},
    "dare_ties": {"base": True, "deterministic": False,
                  "models": [(A, {"weight": 0.6, "density": 0.5}), (B, {"weight": 0.4, "density": 0.5})],
                  "parameters": {}},
    "task_arithmetic": {"base": True, "deterministic": True,
                        "models": [(A, {"weight": 0.6}), (B, {"weight": 0.4})],
                        "parameters": {}},
    "slerp": {"base": True, "deterministic": True,
              "models": [("base", {}), (A, {})],
              "parameters": {"t": 0.5}},
    "linear": {"base": False, "deterministic": True,
               "models": [("base", {"weight": 0.5}), (A, {"weight": 0.3}), (B, {"weight": 0.2})],
               "parameters": {}},
    "sce": {"base": True, "deterministic": True, "models": [(A, {}), (B, {})],
            "parameters": {"select_topk": 0.5}},
    "multislerp": {"base": True, "deterministic": True,
                   "models": [(A, {"weight": 0.6}), (B, {"weight": 0.4})], "parameters": {}},
    "karcher": {"base": False, "deterministic": True, "models": [("base", {}), (A, {}), (B, {})],
                "parameters": {}},
    "nearswap": {"base": True, "deterministic": True, "models": [(A, {})], "parameters": {"t": 0.001}},
    # mergekit takes arcee_fusion's quantiles from a random sample of tensors over 1M entries: compared by statistics
    "arcee_fusion": {"base": True, "deterministic": False, "models": [(A, {})], "parameters": {}},
    "ram": {"base": True, "deterministic": True, "models": [(A, {}), (B, {})], "parameters": {}},
    "ramplus_tl": {"base": True, "deterministic": True, "models": [(A, {}), (B, {})], "parameters": {}},
}


def emit(**fields) -> None:
    print(json.dumps({"bench": "merge", **fields}), flush=True)


# ---------------------------------------------------------------------------------------------
# models and recipes


@pytest.fixture(scope="session")
def model_paths() -> dict[str, Path]:
    if os.environ.get("BENCH_MODEL_DIR"):
        base = Path(os.environ["BENCH_MODEL_DIR"]).resolve()
    else:
        proc = subprocess.run([str(VENV_BIN / "workbench"), "models", "prepare-default"],
                              check=False, capture_output=True, text=True, env=child_env())
        if proc.returncode != 0:
            pytest.fail(f"`workbench models prepare-default` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
        base = Path(lines[-1]).resolve()
    if not (base / "config.json").is_file():
        pytest.fail(f"no model at {base}")
    from workbench.models.variants import ensure_variants

    a, b = ensure_variants(base, ["variant-a", "variant-b"])
    paths = {"base": base, "variant-a": a.resolve(), "variant-b": b.resolve()}
    # warm the page cache: both tools then read the models from memory, not from disk
    for p in paths.values():
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
    return paths


def recipe_yaml(method: str, paths: dict[str, Path]) -> str:
    spec = METHODS[method]
    doc: dict = {"merge_method": method}
    if spec["base"]:
        doc["base_model"] = str(paths["base"])
    doc["models"] = [{"model": str(paths[m]), **({"parameters": p} if p else {})} for m, p in spec["models"]]
    if spec["parameters"]:
        doc["parameters"] = spec["parameters"]
    doc["dtype"] = "float32"
    import yaml

    return yaml.safe_dump(doc, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# running a child and measuring it


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


@dataclass
class Run:
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    maxrss_mb: float  # os.wait4 high-water mark
    tree_rss_mb: float  # sampled sum over the process tree
    max_procs: int
    other_cpu_s: float  # CPU time used meanwhile by everything else on the machine (noise)
    returncode: int
    log: str


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all but idle and iowait), from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


# A tiny launcher forks and execs the tool and reports os.wait4's figures. The tool must not be
# spawned from this (large) pytest process: Linux carries the spawning process's RSS high-water
# mark over exec into the child's ru_maxrss, so a child of pytest reports at least pytest's RSS.
LAUNCHER = r"""
import json, os, sys, time
result, log, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        os.execv(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(result, "w") as f:
    json.dump({"wall_s": wall, "maxrss_kib": usage.ru_maxrss, "cpu_s": usage.ru_utime + usage.ru_stime,
               "returncode": os.waitstatus_to_exitcode(status)}, f)
"""


def wait_for_quiet(max_wait_s: float, window_s: float = 1.0) -> float:
    """Wait (at most ``max_wait_s``) until the machine is idle for ``window_s``; the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < max_wait_s:
        before = busy_cpu_s()
        time.sleep(window_s)
        if busy_cpu_s() - before <= QUIET_FRACTION * window_s:
            break
    return time.monotonic() - start


def measure(cmd: list[str], log_path: Path, cwd: Path) -> Run:
    result_path = log_path.with_suffix(".json")
    busy_before, self_before = busy_cpu_s(), time.process_time()
    launcher = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, str(result_path), str(log_path), *cmd],
                                env=child_env(), cwd=cwd, stdin=subprocess.DEVNULL)
    peak_tree, max_procs, done = 0, 0, threading.Event()

    def sample() -> None:  # RSS summed over the launcher's descendants (the tool and its children)
        nonlocal peak_tree, max_procs
        try:
            root = psutil.Process(launcher.pid)
        except psutil.Error:
            return
        while not done.is_set():
            total, procs = 0, 0
            try:
                family = root.children(recursive=True)
            except psutil.Error:
                break
            for p in family:
                try:
                    total += p.memory_info().rss
                    procs += 1
                except psutil.Error:
                    pass
            peak_tree, max_procs = max(peak_tree, total), max(max_procs, procs)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    launcher.wait()
    done.set()
    sampler.join()
    busy = busy_cpu_s() - busy_before - (time.process_time() - self_before)  # less this process (sampling)
    if launcher.returncode != 0 or not result_path.is_file():
        pytest.fail(f"the launcher failed ({launcher.returncode}) running {cmd}")
    res = json.loads(result_path.read_text())
    maxrss = res["maxrss_kib"] / 1024
    tree = peak_tree / 2**20
    return Run(wall_s=res["wall_s"], cpu_s=res["cpu_s"], peak_rss_mb=max(maxrss, tree), maxrss_mb=maxrss,
               tree_rss_mb=tree, max_procs=max_procs, other_cpu_s=max(0.0, busy - res["cpu_s"]),
               returncode=res["returncode"],
               log=log_path.read_text(errors="replace") if log_path.is_file() else "")


def mergekit_yaml() -> Path:
    candidates = [os.environ.get("BENCH_MERGEKIT_YAML"), VENV_BIN / "mergekit-yaml",
                  REPO / ".venv-peers" / "bin" / "mergekit-yaml", shutil.which("mergekit-yaml")]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    pytest.fail("mergekit-yaml not found; `make bench` installs mergekit (the bench extra)")


def tool_commands(method: str, recipe: Path, out: Path) -> dict[str, list[str]]:
    return {
        "workbench": [str(VENV_BIN / "workbench"), "merge", str(recipe), str(out / "workbench"),
                      "--no-progress", "--seed", str(SEED)],
        "mergekit": [str(mergekit_yaml()), str(recipe), str(out / "mergekit"), "--lazy-unpickle",
                     "--random-seed", str(SEED), "--quiet"],
    }


@pytest.fixture(scope="session", autouse=True)
def warm_imports() -> None:
    """Start each tool once (untimed), so neither pays for a cold page cache of its packages."""
    subprocess.run([str(VENV_BIN / "workbench"), "--help"], check=False, capture_output=True, env=child_env())
    subprocess.run([str(mergekit_yaml()), "--help"], check=False, capture_output=True, env=child_env())


# ---------------------------------------------------------------------------------------------
# reading and comparing outputs


class Tensors:
    """Every tensor of a safetensors model directory, whatever its shard layout."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.handles = [safe_open(str(f), framework="pt") for f in sorted(path.glob("*.safetensors"))]
        self.where = {name: h for h in self.handles for name in h.keys()}  # noqa: SIM118 (a safe_open handle)

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str):
        return self.where[name].get_tensor(name)


def compare_exact(ours: Path, theirs: Path) -> dict:
    a, b = Tensors(ours), Tensors(theirs)
    common = sorted(a.names() & b.names())
    worst, worst_name, worst_rel, shape_mismatch, dtypes = 0.0, None, 0.0, [], set()
    for name in common:
        x, y = a.get(name), b.get(name)
        dtypes.add(f"{x.dtype}/{y.dtype}".replace("torch.", ""))
        if x.shape != y.shape:
            shape_mismatch.append(name)
            continue
        d = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        if math.isnan(d):
            d = float("inf")
        if d > worst or worst_name is None:
            worst, worst_name = d, name
        if d:  # relative to the tensor's largest magnitude
            worst_rel = max(worst_rel, d / max(y.abs().max().item(), 1e-30))
    return {"max_abs_diff": worst, "worst_tensor": worst_name, "max_rel_diff": worst_rel,
            "tensors_compared": len(common), "missing_in_workbench": sorted(b.names() - a.names()),
            "missing_in_mergekit": sorted(a.names() - b.names()), "shape_mismatch": shape_mismatch,
            "dtypes": sorted(dtypes)}


def delta_stats(out: Path, base: Path) -> dict:
    """Fraction of entries that differ from the base, and mean |out - base| (all entries; changed ones)."""
    o, b = Tensors(out), Tensors(base)
    numel = changed = 0
    abs_sum = 0.0
    for name in sorted(o.names() & b.names()):
        x, y = o.get(name).double(), b.get(name).double()
        d = (x - y).abs()
        numel += d.numel()
        changed += int((d != 0).sum())
        abs_sum += d.sum().item()
    return {"changed_fraction": changed / max(numel, 1), "mean_abs_delta": abs_sum / max(numel, 1),
            "mean_abs_delta_changed": abs_sum / max(changed, 1), "numel": numel}


# ---------------------------------------------------------------------------------------------
# the benchmark


def quiet(run: Run) -> bool:
    """Whether the rest of the machine stayed (nearly) idle during the run: under CPU contention
    the wall times of both tools stretch by several times and their ratio means little."""
    return run.other_cpu_s <= max(0.5, QUIET_FRACTION * run.wall_s)


def run_commands(commands: dict[str, list[str]], outputs: dict[str, list[Path]], work: Path, repeats: int,
                 max_attempts: int, what: str) -> dict[str, list[Run]]:
    """Each tool's command until it has ``repeats`` quiet runs or ``max_attempts`` runs, interleaved
    (first tool, second tool, first tool, ...); ``outputs[tool]`` (paths the tool writes) are
    removed before each of its runs. ``what`` names the job in a failure."""
    runs: dict[str, list[Run]] = {}
    for _ in range(max_attempts):
        for tool, cmd in commands.items():
            if sum(quiet(r) for r in runs.get(tool, [])) >= repeats:
                continue
            for out in outputs.get(tool, []):
                if out.is_dir():
                    shutil.rmtree(out)
                elif out.exists():
                    out.unlink()
            wait_for_quiet(QUIET_WAIT_S)
            run = measure(cmd, work / f"{tool}.log", cwd=work)
            if run.returncode != 0:
                pytest.fail(f"{tool} failed on {what} ({run.returncode}):\n{' '.join(cmd)}\n{run.log[-4000:]}")
            runs.setdefault(tool, []).append(run)
        if all(sum(quiet(r) for r in rs) >= repeats for rs in runs.values()):
            break
    return runs


def run_tools(method: str, recipe: Path, work: Path, repeats: int, max_attempts: int) -> dict[str, list[Run]]:
    """Each tool until it has ``repeats`` quiet runs or ``max_attempts`` runs, interleaved
    (workbench, mergekit, workbench, ...)."""
    commands = tool_commands(method, recipe, work)
    return run_commands(commands, {tool: [work / tool] for tool in commands}, work, repeats, max_attempts, method)


def measure_pair(key: str, label: str, all_runs: dict[str, list[Run]], show=None) -> tuple[dict[str, Run], dict]:
    """Each tool's runs summarized and printed by ``show`` (default: this bench's ``emit``; one figure
    line per tool, ``{key: label}`` first); returns the summaries and the ratio figures (workbench /
    mergekit), not yet printed."""
    show = show or emit
    runs = {tool: summarize(rs) for tool, rs in all_runs.items()}
    for tool, r in runs.items():
        show(**{key: label}, tool=tool, **run_figures(r, all_runs[tool]))
    ours, theirs = runs["workbench"], runs["mergekit"]
    return runs, {key: label, "time_ratio": round(ours.wall_s / theirs.wall_s, 4),
                  "rss_ratio": round(ours.peak_rss_mb / theirs.peak_rss_mb, 4), "quiet": quiet(ours) and quiet(theirs)}


def speed_failures(runs: dict[str, Run], ratio: dict, max_attempts: int, judge_rss: bool = True) -> list[str]:
    """The time and memory targets missed (a time ratio without quiet runs of both is inconclusive)."""
    ours, theirs = runs["workbench"], runs["mergekit"]
    failures = []
    if not ratio["quiet"]:  # a ratio of times taken under different loads means nothing, either way
        failures.append(f"wall time ratio {ratio['time_ratio']:.3f} is inconclusive: no quiet run of "
                        f"{' and '.join(t for t, r in runs.items() if not quiet(r))} in {max_attempts} "
                        f"(other processes used the CPUs); rerun on an idle machine")
    elif ratio["time_ratio"] > TIME_RATIO:
        failures.append(f"wall time ratio {ratio['time_ratio']:.3f} > {TIME_RATIO:.3f} "
                        f"({ours.wall_s:.2f} s vs {theirs.wall_s:.2f} s)")
    if judge_rss and ratio["rss_ratio"] > RSS_RATIO:
        failures.append(f"peak RSS ratio {ratio['rss_ratio']:.3f} > {RSS_RATIO:.3f} "
                        f"({ours.peak_rss_mb:.0f} MB vs {theirs.peak_rss_mb:.0f} MB)")
    return failures


def run_figures(r: Run, runs: list[Run]) -> dict:
    """The JSON figures of one tool's summarized run ``r`` (of ``runs``)."""
    return {"wall_s": round(r.wall_s, 3), "cpu_s": round(r.cpu_s, 3), "peak_rss_mb": round(r.peak_rss_mb, 1),
            "maxrss_mb": round(r.maxrss_mb, 1), "tree_rss_sampled_mb": round(r.tree_rss_mb, 1),
            "max_procs": r.max_procs, "other_cpu_s": round(r.other_cpu_s, 2), "quiet": quiet(r), "runs": len(runs),
            "wall_s_all": [round(x.wall_s, 3) for x in runs], "other_cpu_s_all": [round(x.other_cpu_s, 2) for x in runs]}


def summarize(runs: list[Run]) -> Run:
    """Best (least) wall time of the quiet runs (of all, if none was quiet); the worst (largest) peak RSS."""
    best = min([r for r in runs if quiet(r)] or runs, key=lambda r: r.wall_s)
    worst = max(runs, key=lambda r: r.peak_rss_mb)
    return Run(wall_s=best.wall_s, cpu_s=best.cpu_s, peak_rss_mb=worst.peak_rss_mb, maxrss_mb=worst.maxrss_mb,
               tree_rss_mb=worst.tree_rss_mb, max_procs=max(r.max_procs for r in runs),
               other_cpu_s=best.other_cpu_s, returncode=0, log=best.log)


@pytest.mark.parametrize("method", list(METHODS))
def test_merge_bench(method: str, model_paths: dict[str, Path]) -> None:
    selected = os.environ.get("BENCH_METHODS")
    if selected and method not in selected.split(","):
        pytest.skip(f"not in BENCH_METHODS={selected}")
    repeats = max(1, int(os.environ.get("BENCH_REPEATS", "1")))
    max_attempts = max(repeats, int(os.environ.get("BENCH_MAX_ATTEMPTS", "3")))
    check_targets = os.environ.get("BENCH_NO_TARGETS", "") in ("", "0")

    work = Path(tempfile.mkdtemp(prefix=f"wb-bench-{method}-", dir=os.environ.get("BENCH_TMPDIR")))
    try:
        recipe = work / "recipe.yml"
        recipe.write_text(recipe_yaml(method, model_paths))
        runs, ratio = measure_pair("method", method, run_tools(method, recipe, work, repeats, max_attempts))
        failures = []
        if METHODS[method]["deterministic"]:
            cmp = compare_exact(work / "workbench", work / "mergekit")
            ratio.update(cmp)
            if cmp["max_abs_diff"] > MAX_ABS_DIFF or cmp["shape_mismatch"] or not cmp["tensors_compared"]:
                failures.append(f"max_abs_diff {cmp['max_abs_diff']:.3g} > {MAX_ABS_DIFF:g} "
                                f"(worst {cmp['worst_tensor']}; shape mismatches {cmp['shape_mismatch']})")
        else:
            ours_s = delta_stats(work / "workbench", model_paths["base"])
            theirs_s = delta_stats(work / "mergekit", model_paths["base"])
            for tool, s in (("workbench", ours_s), ("mergekit", theirs_s)):
                emit(method=method, tool=tool, stat="delta_vs_base", **s)
            ratio["max_abs_diff"] = None
            ratio["changed_fraction_diff"] = ours_s["changed_fraction"] - theirs_s["changed_fraction"]
            ratio["mean_abs_delta_ratio"] = ours_s["mean_abs_delta"] / max(theirs_s["mean_abs_delta"], 1e-30)
            if abs(ratio["changed_fraction_diff"]) > DARE_CHANGED_ABS_TOL:
                failures.append(f"changed fraction {ours_s['changed_fraction']:.4f} vs mergekit "
                                f"{theirs_s['changed_fraction']:.4f}")
            if abs(ratio["mean_abs_delta_ratio"] - 1) > DARE_MEAN_DELTA_REL_TOL:
                failures.append(f"mean |delta| ratio {ratio['mean_abs_delta_ratio']:.4f} (ours/mergekit)")
        emit(**ratio)
        failures += speed_failures(runs, ratio, max_attempts)
        if check_targets:
            assert not failures, f"{method}: " + "; ".join(failures)
    finally:
        shutil.rmtree(work, ignore_errors=True)
