"""Crash safety by fault injection: every action killed (a real SIGKILL) at its write boundaries.

For each action (merge, quantize, recover, export hf / peft / gguf, merge search, quantization
search, zoo build) a first run with ``WORKBENCH_FAULT_COUNT`` counts the `workbench.faults` points
it passes (N) and is the reference output; then, for a seeded sample of kill points K in 1..N, a
run with ``WORKBENCH_KILL_AT=K`` must die by SIGKILL and leave (a) nothing finished-looking that is
not complete: each output absent or equal to the reference; then (b) a resumable action, resumed,
gives the reference's result (same history rows, tensors, best), and (c) a non-resumable one,
rerun, succeeds (the leftovers of the killed run removed, not refused) and gives the reference.
Timing fields (seconds, elapsed, phases, wall time) are left out of the comparisons.

Runs are forked from one fork server (tests/fault_driver.py: torch and workbench imported once),
each child on one torch thread. Disk full: merge, quantize and an export under a small
RLIMIT_FSIZE must end with exit code 2 and one ``error:`` line naming the output, no traceback,
nothing at the output.

Kill points (N, sampled) measured here (2-core CPU; the whole file about 50 s, most of it the
reference and killed runs of recover, the two searches, merge and zoo build, 5-7 s each):

    merge 41/20, quantize 3/3, export hf 3/3, peft 6/6, gguf 9/9 (export_gguf_with_lora, what the
    CLI's gguf export calls for a model with adapters), recover 26/20, merge search 17/17,
    quantization search 18/18, zoo build 16/16
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import save_tiny_model, write_quant_inputs, write_tiny_task

HERE = Path(__file__).parent
VOLATILE = {"seconds", "merge_seconds", "elapsed", "wall_seconds", "resumed_from_step", "load_average_at_start",
            "phases", "build_seconds", "levels_seconds", "time", "loss_seconds", "step_seconds", "wall"}
SEED = 1234


# --- the fork server ------------------------------------------------------------------------------

class Driver:
    def __init__(self, log: Path):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WORKBENCH_KERNELS": "0",
               "PYTHONDONTWRITEBYTECODE": "1"}  # under RLIMIT_FSIZE importlib writes truncated .pyc files
        env.pop("WORKBENCH_KILL_AT", None)
        env.pop("WORKBENCH_FAULT_COUNT", None)
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(HERE / "fault_driver.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env,
                                     cwd=HERE.parent)
        self.n = 0

    def run(self, argv: list[str], env: dict | None = None, setup: str | None = None, fsize: int | None = None,
            cwd: Path | None = None) -> dict:
        self.n += 1
        err = self.log.with_name(f"run-{self.n}.err")
        env = {"WORKBENCH_KILL_AT": None, "WORKBENCH_FAULT_COUNT": None, **(env or {})}
        req = {"argv": [str(a) for a in argv], "env": {k: None if v is None else str(v) for k, v in env.items()},
               "stderr": str(err), "stdout": str(err.with_suffix(".out")), "setup": setup, "fsize": fsize,
               "cwd": str(cwd or HERE.parent)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died: {self.log.read_text()[-3000:]}")
        answer = json.loads(line)
        answer["stderr"] = err.read_text(errors="replace")
        return answer

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    d = Driver(tmp_path_factory.mktemp("driver") / "driver.log")
    yield d
    d.close()


# --- comparing outputs ----------------------------------------------------------------------------

def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _file_view(path: Path):
    data = path.read_bytes()
    if path.suffix == ".json":
        return _strip(json.loads(data))
    if path.suffix == ".jsonl":
        return [_strip(json.loads(line)) for line in data.decode().splitlines() if line]
    if path.suffix == ".safetensors":  # the header as JSON: safetensors writes its metadata map in any order
        n = int.from_bytes(data[:8], "little")
        return json.loads(data[8:8 + n]), hashlib.sha256(data[8 + n:]).hexdigest()
    return hashlib.sha256(data).hexdigest()


def snapshot(path: Path):
    """What is at `path` (None: nothing), file by file, timing fields left out; temporaries beside a
    file or inside a directory (dot names) and a search's checkpoint files are not part of it (the
    resumed run's result is: history rows, best recipe, front)."""
    if not path.exists():
        return None
    if path.is_file():
        return _file_view(path)
    return {str(p.relative_to(path)): _file_view(p) for p in sorted(path.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and not p.name.startswith("checkpoint")}  # a search's state: pycma pickles its timers


def stale(paths: list[Path]) -> list[str]:
    """Temporaries of workbench's atomic writes beside or inside `paths`."""
    found = []
    for p in paths:
        for d in {p.parent} | ({p} if p.is_dir() else set()):
            found += [str(d / n) for n in os.listdir(d) if n.startswith(f".") and ".tmp-" in n]
    return sorted(set(found))


def kill_points(n: int, sample: int, seed: int = SEED) -> list[int]:
    """All of 1..n when few, else the first, the last and a seeded sample between."""
    if n <= sample:
        return list(range(1, n + 1))
    rng = random.Random(seed)
    return sorted({1, n, *rng.sample(range(2, n), sample - 2)})


def sweep(driver: Driver, work: Path, argv: list, outputs: list[Path], *, sample: int, again=None,
          prepare=None, env: dict | None = None, setup: str | None = None, partial_ok=None) -> dict:
    """Reference run (counting the points), then one killed run per sampled point, each checked and
    followed by `again` (the resume or rerun command; default: `argv` again)."""
    def fresh():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        if prepare:
            prepare(work)

    env = env or {}
    fresh()
    counts = work.parent / f"{work.name}.points"
    counts.unlink(missing_ok=True)
    t0 = time.perf_counter()
    r = driver.run(argv, {**env, "WORKBENCH_FAULT_COUNT": counts}, setup)
    assert r["rc"] == 0, r["stderr"][-3000:]
    one_run = time.perf_counter() - t0
    ref = {str(p): snapshot(p) for p in outputs}
    assert all(v is not None for v in ref.values()), ref.keys()
    names = counts.read_text().splitlines()
    ks = kill_points(len(names), sample)
    for k in ks:
        fresh()
        r = driver.run(argv, {**env, "WORKBENCH_KILL_AT": k}, setup)
        where = f"kill point {k}/{len(names)} ({names[k - 1]})"
        assert r["signal"] == signal.SIGKILL and r["rc"] is None, f"{where}: {r}"
        complete = True
        for p in outputs:
            got = snapshot(p)
            if partial_ok and partial_ok(p):
                got = None if got is None else ref[str(p)]  # a work directory: checked by `partial_ok`
            assert got is None or got == ref[str(p)], f"{where}: {p} looks finished but differs from the reference"
            complete &= got is not None
        if complete and again is None:
            continue  # killed after the output was complete: nothing to rerun
        r = driver.run(again or argv, env, setup)
        assert r["rc"] == 0, f"{where}: the {'resume' if again else 'rerun'} failed: {r['stderr'][-3000:]}"
        for p in outputs:
            assert snapshot(p) == ref[str(p)], f"{where}: after the {'resume' if again else 'rerun'}, {p} differs"
        assert not stale(outputs), f"{where}: leftovers {stale(outputs)}"
    report = {"points": len(names), "sampled": len(ks), "one_run_s": round(one_run, 2), "names": sorted(set(names))}
    print(json.dumps(report))
    return report


# --- inputs ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    base = save_tiny_model(root / "base", "llama", seed=0)
    variants = [save_tiny_model(root / f"v{i}", "llama", seed=i, base=base) for i in (1, 2)]
    recipe = root / "recipe.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base),
                                      "models": [{"model": str(v), "parameters": {"weight": 0.5, "density": 0.5}}
                                                 for v in variants], "parameters": {"normalize": True}}))
    cfg, task, corpus = write_quant_inputs(root)
    return {"root": root, "base": base, "variants": variants, "recipe": recipe, "cfg": cfg, "task": task,
            "corpus": corpus}


@pytest.fixture(scope="module")
def quantized(driver, inputs):
    """A quantized (2-bit, LoRA rank 2) copy of the base model."""
    out = inputs["root"] / "q"
    r = driver.run(["quantize", inputs["base"], "--config", inputs["cfg"], "--out", out, "--no-eval", "--no-progress"])
    assert r["rc"] == 0, r["stderr"]
    return out


# --- the actions ----------------------------------------------------------------------------------

def test_merge(driver, inputs, tmp_path):
    out = tmp_path / "w" / "out"
    sweep(driver, tmp_path / "w", ["merge", inputs["recipe"], out, "--no-progress", "--shard-size", "60KB"], [out],
          sample=20)


def test_quantize(driver, inputs, tmp_path):
    out = tmp_path / "w" / "q"
    sweep(driver, tmp_path / "w", ["quantize", inputs["base"], "--config", inputs["cfg"], "--out", out, "--no-eval",
                                   "--no-progress"], [out], sample=20)


@pytest.mark.parametrize("fmt", ["hf", "peft"])
def test_export(driver, quantized, tmp_path, fmt):
    out = tmp_path / "w" / "e"
    sweep(driver, tmp_path / "w", ["export", quantized, "--format", fmt, "--out", out], [out], sample=20)


@pytest.fixture(scope="module")
def gguf_quantized(driver, inputs):
    """A tiny llama with a byte-level BPE tokenizer (what the GGUF export writes), quantized with LoRA."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from test_export_gguf import _bpe_tokenizer

    src = inputs["root"] / "bpe-src"
    n_tok = _bpe_tokenizer(src)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=n_tok + 12, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    cfg = inputs["root"] / "gguf-q.yml"
    cfg.write_text("bits: 1.58\ngroup_size: 64\nlora: {rank: 2}\n")
    out = inputs["root"] / "bpe-q"
    r = driver.run(["quantize", src, "--config", cfg, "--out", out, "--no-eval", "--no-progress"])
    assert r["rc"] == 0, r["stderr"]
    return out


def test_export_gguf(driver, gguf_quantized, tmp_path):
    out = tmp_path / "w" / "m.gguf"
    sweep(driver, tmp_path / "w", ["export", gguf_quantized, "--format", "gguf", "--out", out],
          [out, out.with_name("m.lora.gguf")], sample=20)


GGUF_PAIR = """
import os
from workbench.atomic import check_output
from workbench.export.gguf import export_gguf_with_lora
for p in ({out!r}, {lora!r}):
    check_output(p, file=True)   # as `workbench export` checks its outputs first
export_gguf_with_lora({q!r}, {out!r}, {lora!r})
os._exit(0)
"""


def test_export_gguf_with_lora_commits_both_files_together(driver, gguf_quantized, tmp_path):
    """What `workbench export --format gguf` calls for a model with adapters."""
    out = tmp_path / "w" / "m.gguf"
    lora = out.with_name("m.lora.gguf")
    sweep(driver, tmp_path / "w", ["--help"], [out, lora], sample=20,
          setup=GGUF_PAIR.format(q=str(gguf_quantized), out=str(out), lora=str(lora)))


def test_recover(driver, inputs, quantized, tmp_path):
    """Resumable: a rerun of the same command resumes from OUT.work (the teacher cache lives in the
    home, fresh per run, so every run does the same work)."""
    out = tmp_path / "w" / "r"
    argv = ["recover", quantized, "--teacher", inputs["base"], "--corpus", inputs["corpus"], "--out", out,
            "--steps", "4", "--block-steps", "2", "--seq-len", "32", "--max-tokens", "512", "--block-tokens", "256",
            "--top-k", "8", "--checkpoint-every", "2", "--dtype", "float32", "--no-eval", "--no-progress"]
    sweep(driver, tmp_path / "w", argv, [out], sample=20, env={"WORKBENCH_HOME": tmp_path / "w" / "home"})


def _search_partial(run: Path):
    """A killed search's run directory: every file whole (history: whole rows, but for the last one)."""
    def check(p: Path) -> bool:
        if not p.is_dir():
            return True
        for f in p.iterdir():
            if f.name.startswith("."):
                continue
            if f.name == "history.jsonl":
                lines = f.read_text().splitlines()
                for line in lines[:-1]:
                    json.loads(line)
            elif f.suffix == ".json" or f.name == "spec.yml":
                json.loads(f.read_text())
            elif f.suffix == ".yml":
                yaml.safe_load(f.read_text())
        return True
    return check


def test_merge_search(driver, inputs, tmp_path):
    task = write_tiny_task(inputs["root"] / "tiny.yml")
    spec = inputs["root"] / "s-search.yml"
    spec.write_text(yaml.safe_dump({
        "name": "faults", "base_model": str(inputs["base"]), "models": [str(v) for v in inputs["variants"]],
        "merge_method": "linear", "evolve": {"weight": [0.0, 1.0]}, "objective": [{"task": str(task)}],
        "budget": {"generations": 2, "population": 3}, "seed": 1}))
    run = tmp_path / "w" / "run"
    argv = ["search", spec, "--out", run, "--no-progress", "--no-report"]
    again = ["search", "--resume", run, "--no-progress", "--no-report"]
    # the resume needs spec.yml: a run killed before it was written is started again as it was
    _resume_or_start(driver, tmp_path / "w", argv, again, run, sample=20)


def _resume_or_start(driver, work, argv, again, run, sample, env=None, setup=None):
    class Again(list):
        """`--resume RUN` when the run wrote its spec.yml, else the first command again."""

        def __iter__(self):
            return iter(again if (run / "spec.yml").is_file() else argv)

    outputs = [run]
    return sweep(driver, work, argv, outputs, sample=sample, again=Again(again), env=env, setup=setup,
                 partial_ok=_search_partial(run))


QUANT_SPEC = """kind: quantization
model: {model}
options:
  formats: [{{bits: ternary, group_size: 16}}, {{bits: 2, group_size: 16}}]
  ranks: [0, 2]
targets: [5.0]
seq_len: 32
stages: [{{windows: 2, keep: 1}}]
budget: {{generations: 2, offspring: 2}}
heldout_windows: 2
heldout_task: {task}
"""


def test_quant_search(driver, inputs, tmp_path):
    spec = inputs["root"] / "q-search.yml"
    spec.write_text(QUANT_SPEC.format(model=inputs["base"], task=inputs["task"]))
    home = tmp_path / "home"   # the layer database, built once here and shared by every run
    run = tmp_path / "w" / "run"
    argv = ["search", spec, "--out", run, "--no-progress"]
    again = ["search", "--resume", run, "--no-progress"]
    env = {"WORKBENCH_HOME": home}
    warm = driver.run(["search", spec, "--out", tmp_path / "warm", "--no-progress"], env)
    assert warm["rc"] == 0, warm["stderr"][-3000:]
    _resume_or_start(driver, tmp_path / "w", argv, again, run, sample=20, env=env)


ZOO_SETUP = """
from workbench.zoo import build as B
from workbench.zoo.train import TrainConfig
cfg = dict(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=2, chat_template=False)
B.EXPERTS = {
    "zoo-expert-arith": B.ExpertSpec("zoo-expert-arith", "arith", "tiny arith", TrainConfig(seed=1, **cfg), 11),
    "zoo-expert-french": B.ExpertSpec("zoo-expert-french", "french", "tiny french",
                                      TrainConfig(seed=2, trainable=("mlp.",), layers=(2, 4), **cfg), 12),
}
B.pick_threads = lambda requested=None: 1
"""


def test_zoo_build(driver, inputs, tmp_path):
    """Resumable: `zoo build` again goes on from each expert's checkpoint."""
    home = tmp_path / "w" / "home"

    def prepare(work: Path) -> None:
        shutil.copytree(inputs["base"], home / "models" / "SmolLM2-135M-Instruct")

    outputs = [home / "models" / n for n in ("zoo-expert-arith", "zoo-expert-french")]
    sweep(driver, tmp_path / "w", ["zoo", "build", "--no-progress"], outputs, sample=20, again=["zoo", "build",
          "--no-progress"], prepare=prepare, env={"WORKBENCH_HOME": home}, setup=ZOO_SETUP)


# --- disk full ------------------------------------------------------------------------------------

def _check_disk_full(r: dict, out: Path) -> None:
    err = r["stderr"]
    assert r["rc"] == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(out) in lines[0], err[-3000:]
    assert "disk full" in lines[0].lower() or "file too large" in lines[0].lower(), lines[0]
    assert not out.exists() and not stale([out]), (out, stale([out]))


LIMIT = 16 * 1024  # bytes per file: the tokenizer and configs fit, the weights do not


def test_disk_full_merge_in_a_real_process(inputs, tmp_path):
    """The console script as a user runs it, with a file-size limit: EFBIG on the shards."""
    import resource

    out = tmp_path / "out"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))

    env = {**os.environ, "WORKBENCH_KERNELS": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}  # a .pyc written under the limit would be cut short
    p = subprocess.run([sys.executable, "-c", "from workbench.cli import entry; entry()", "merge", str(inputs["recipe"]),
                        str(out), "--no-progress"], capture_output=True, text=True, preexec_fn=limit, env=env,
                       timeout=120)
    _check_disk_full({"rc": p.returncode, "stderr": p.stderr}, out)


def test_disk_full_quantize_and_export(driver, inputs, quantized, tmp_path):
    out = tmp_path / "q"
    r = driver.run(["quantize", inputs["base"], "--config", inputs["cfg"], "--out", out, "--no-eval", "--no-progress"],
                   fsize=LIMIT)
    _check_disk_full(r, out)
    for fmt in ("hf", "peft"):
        out = tmp_path / f"e-{fmt}"
        _check_disk_full(driver.run(["export", quantized, "--format", fmt, "--out", out], fsize=LIMIT), out)
