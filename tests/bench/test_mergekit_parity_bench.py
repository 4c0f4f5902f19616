"""Side-by-side benchmark of the mergekit-compatible extras against mergekit 0.1.5 itself.

Run by `make bench` (pytest -s), beside test_merge_bench.py, whose launcher, quiet wait and RSS
measurement it uses (see that file for how wall time and peak RSS are taken and what "quiet"
means). Over the default model (SmolLM2-135M-Instruct) and its two seeded variants:

- ``model+lora``: a peft LoRA adapter (rank 16 on q/k/v/o/gate/up/down, seeded random A and B,
  safetensors) made here; a task_arithmetic recipe names ``BASE+ADAPTER``; `workbench merge`
  vs `mergekit-yaml` (which merges the adapter into a full copy in its --lora-merge-cache first:
  a fresh cache each run, so that work is timed). Targets: max |ours - mergekit| <= 1e-5, and
  ours/mergekit <= 1/3 for wall time and peak RSS.
- ``moe-random`` / ``moe-hidden``: a mergekit-moe config, the base and both variants as experts,
  ``gate_mode: random`` (both tools seeded alike) and ``gate_mode: hidden`` (short real prompts);
  `workbench moe` vs `mergekit-moe --random-seed`. mergekit 0.1.5 writes transformers 5's fused
  Mixtral experts (``mlp.experts.gate_up_proj``), workbench the per-expert checkpoint names
  (``block_sparse_moe.experts.N.w1/w2/w3``): both are loaded with transformers'
  AutoModelForCausalLM and their state dicts compared. Targets: max abs diff <= 1e-5 (routers
  and the other weights reported apart), time and RSS ratios <= 1/3.
- ``extract-lora``: variant-a less the base at rank 32, `workbench extract-lora` vs
  `mergekit-extract-lora`; the A and B factors (each rank-1 component's sign aligned: an SVD's
  singular vectors are defined up to sign), the singular values (||A_i||^2, with the scale
  distributed evenly as both tools do by default) and the full-rank modules_to_save tensors are
  compared. Targets: max abs diff <= 1e-4, time ratio <= 1/3 (peak RSS printed, not judged).

One JSON line per figure, ``{"bench": "mergekit_parity", "case": ..., ...}``: per tool (as
test_merge_bench.py's) and one with the ratios and the comparison. Targets are asserted after
all figures of a case are printed.

Environment knobs: as test_merge_bench.py (BENCH_REPEATS, BENCH_MAX_ATTEMPTS, BENCH_QUIET_WAIT,
BENCH_MODEL_DIR, BENCH_TMPDIR, BENCH_NO_TARGETS), BENCH_CASES=model+lora,moe-random (a subset),
and BENCH_MERGEKIT_BIN: the folder holding mergekit-yaml, mergekit-moe and mergekit-extract-lora
(default: this venv's bin, then /tmp/mkvenv/bin, a side venv with mergekit 0.1.5).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from test_merge_bench import (  # noqa: F401 (model_paths is a fixture)
    MAX_ABS_DIFF,
    VENV_BIN,
    Tensors,
    child_env,
    compare_exact,
    measure_pair,
    model_paths,
    run_commands,
    speed_failures,
)

SEED = 0
LORA_RANK, LORA_ALPHA = 16, 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_B_STD = 0.01   # peft starts B at zero: a random B makes the update non-zero
EXTRACT_RANK = 32
EXTRACT_MAX_ABS_DIFF = 1e-4
CASES = ["model+lora", "moe-random", "moe-hidden", "extract-lora"]
MOE_PROMPTS = [
    (["Hello! How are you today?", "Tell me a short story about a dragon."], ["def add(a, b):"]),
    (["def fibonacci(n):", "import numpy as np\nx = np.zeros(3)"], None),
    (["What is 12 times 7?", "Solve for x: 2x + 3 = 11."], ["Once upon a time"]),
]


def emit(**fields) -> None:
    print(json.dumps({"bench": "mergekit_parity", **fields}), flush=True)


def mergekit_bin(tool: str) -> Path:
    candidates = [os.environ.get("BENCH_MERGEKIT_BIN"), VENV_BIN, Path("/tmp/mkvenv/bin")]
    for c in candidates:
        if c and (Path(c) / tool).is_file():
            return Path(c) / tool
    pytest.fail(f"{tool} not found in {[str(c) for c in candidates if c]}; set BENCH_MERGEKIT_BIN to the bin "
                "folder of a venv with mergekit 0.1.5")


@pytest.fixture(scope="session", autouse=True)
def warm_tools() -> None:
    """Start each tool once (untimed), so none pays for a cold page cache of its packages."""
    for cmd in ([str(VENV_BIN / "workbench"), "--help"], [str(mergekit_bin("mergekit-yaml")), "--help"],
                [str(mergekit_bin("mergekit-moe")), "--help"], [str(mergekit_bin("mergekit-extract-lora")), "--help"]):
        subprocess.run(cmd, check=False, capture_output=True, env=child_env())


@pytest.fixture(scope="session")
def scratch():
    d = Path(tempfile.mkdtemp(prefix="wb-parity-", dir=os.environ.get("BENCH_TMPDIR")))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def adapter(model_paths, scratch) -> Path:
    """A peft LoRA adapter over the base model with seeded random A and B, saved as safetensors."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    out = scratch / "adapter"
    model = AutoModelForCausalLM.from_pretrained(model_paths["base"], dtype=torch.float32)
    torch.manual_seed(SEED)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS,
                                                    lora_dropout=0.0))
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * LORA_B_STD)
    pm.save_pretrained(out, safe_serialization=True)
    assert (out / "adapter_model.safetensors").is_file()
    del pm, model
    return out


def adapter_max_update(path: Path) -> float:
    """max |scale * B @ A| over the adapter's pairs: the largest change it makes to a weight."""
    from safetensors.torch import load_file

    t = load_file(str(path / "adapter_model.safetensors"))
    return max(((t[k.replace(".lora_A.", ".lora_B.")] @ t[k]).abs().max().item() * LORA_ALPHA / LORA_RANK)
               for k in t if ".lora_A." in k)


def selected(case: str) -> None:
    chosen = os.environ.get("BENCH_CASES")
    if chosen and case not in chosen.split(","):
        pytest.skip(f"not in BENCH_CASES={chosen}")


def run_and_report(case: str, commands: dict[str, list[str]], outputs: dict[str, list[Path]], work: Path,
                   judge_rss: bool = True) -> tuple[dict, list[str]]:
    """Both tools measured; their figure lines printed; the ratio figures (not yet printed) and the
    time/RSS failures."""
    repeats = max(1, int(os.environ.get("BENCH_REPEATS", "1")))
    max_attempts = max(repeats, int(os.environ.get("BENCH_MAX_ATTEMPTS", "3")))
    runs, ratio = measure_pair("case", case, run_commands(commands, outputs, work, repeats, max_attempts, case),
                               show=emit)
    return ratio, speed_failures(runs, ratio, max_attempts, judge_rss)


def finish(case: str, ratio: dict, failures: list[str]) -> None:
    emit(**ratio)
    if os.environ.get("BENCH_NO_TARGETS", "") in ("", "0"):
        assert not failures, f"{case}: " + "; ".join(failures)


@pytest.fixture
def work():
    d = Path(tempfile.mkdtemp(prefix="wb-parity-case-", dir=os.environ.get("BENCH_TMPDIR")))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# BASE+ADAPTER in a merge recipe


@pytest.mark.timeout(3600)
def test_model_plus_lora(model_paths, work, request) -> None:
    case = "model+lora"
    selected(case)
    adapter = request.getfixturevalue("adapter")   # made only when the case runs
    import yaml

    recipe = work / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(model_paths["base"]),
        "models": [{"model": f"{model_paths['base']}+{adapter}", "parameters": {"weight": 0.6}},
                   {"model": str(model_paths["variant-b"]), "parameters": {"weight": 0.4}}],
        "dtype": "float32"}, sort_keys=False))
    cache = work / "lora-cache"
    commands = {
        "workbench": [str(VENV_BIN / "workbench"), "merge", str(recipe), str(work / "workbench"), "--no-progress",
                      "--seed", str(SEED)],
        "mergekit": [str(mergekit_bin("mergekit-yaml")), str(recipe), str(work / "mergekit"), "--lazy-unpickle",
                     "--random-seed", str(SEED), "--quiet", "--lora-merge-cache", str(cache)],
    }
    ratio, failures = run_and_report(case, commands, {"workbench": [work / "workbench"],
                                                      "mergekit": [work / "mergekit", cache]}, work)
    cmp = compare_exact(work / "workbench", work / "mergekit")
    ratio.update(cmp)
    ratio["adapter_max_abs_update"] = adapter_max_update(adapter)   # > 0: the adapter changes the merge
    if cmp["max_abs_diff"] > MAX_ABS_DIFF or cmp["shape_mismatch"] or not cmp["tensors_compared"] \
            or cmp["missing_in_workbench"] or cmp["missing_in_mergekit"]:
        failures.insert(0, f"max_abs_diff {cmp['max_abs_diff']:.3g} > {MAX_ABS_DIFF:g} (worst {cmp['worst_tensor']}; "
                           f"shape mismatches {cmp['shape_mismatch']}; missing {cmp['missing_in_workbench']} / "
                           f"{cmp['missing_in_mergekit']})")
    finish(case, ratio, failures)


# ---------------------------------------------------------------------------------------------
# mixture of experts


def moe_config(paths: dict[str, Path], gate_mode: str) -> str:
    import yaml

    experts = []
    for role, (pos, neg) in zip(("base", "variant-a", "variant-b"), MOE_PROMPTS):
        e: dict = {"source_model": str(paths[role])}
        if gate_mode != "random":
            e["positive_prompts"] = pos
            if neg:
                e["negative_prompts"] = neg
        experts.append(e)
    return yaml.safe_dump({"base_model": str(paths["base"]), "gate_mode": gate_mode, "dtype": "float32",
                           "experts_per_token": 2, "experts": experts}, sort_keys=False)


def compare_loaded(ours: Path, theirs: Path) -> dict:
    """Both models loaded by transformers (which reads both expert layouts into one), state dicts
    compared: routers (``...gate.weight``, ``router``) and every other tensor apart."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    def state(path: Path) -> tuple[str, dict]:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
        name = type(m).__name__
        del m
        gc.collect()
        return name, sd

    a_cls, a = state(ours)
    b_cls, b = state(theirs)
    out = {"classes": [a_cls, b_cls], "tensors_compared": 0, "missing_in_workbench": sorted(set(b) - set(a)),
           "missing_in_mergekit": sorted(set(a) - set(b)), "shape_mismatch": [],
           "max_abs_diff_router": 0.0, "worst_router": None, "max_abs_diff_weights": 0.0, "worst_weight": None}
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.shape != y.shape:
            out["shape_mismatch"].append(f"{name} {list(x.shape)} vs {list(y.shape)}")
            continue
        out["tensors_compared"] += 1
        d = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
        if math.isnan(d):
            d = float("inf")
        kind = "router" if (name.endswith(".gate.weight") or "router" in name) else "weight"
        key = "max_abs_diff_router" if kind == "router" else "max_abs_diff_weights"
        if d > out[key] or out["worst_router" if kind == "router" else "worst_weight"] is None:
            out[key] = d
            out["worst_router" if kind == "router" else "worst_weight"] = name
    out["max_abs_diff"] = max(out["max_abs_diff_router"], out["max_abs_diff_weights"])
    return out


def moe_case(case: str, gate_mode: str, paths: dict[str, Path], work: Path) -> None:
    selected(case)
    config = work / "moe.yml"
    config.write_text(moe_config(paths, gate_mode))
    commands = {
        "workbench": [str(VENV_BIN / "workbench"), "moe", str(config), str(work / "workbench"), "--seed", str(SEED),
                      "--no-progress"],
        "mergekit": [str(mergekit_bin("mergekit-moe")), str(config), str(work / "mergekit"), "--random-seed",
                     str(SEED), "--lazy-unpickle", "--quiet"],
    }
    ratio, failures = run_and_report(case, commands, {t: [work / t] for t in commands}, work)
    files = {t: sorted(p.name for p in (work / t).glob("*.safetensors")) for t in commands}
    raw = {t: Tensors(work / t).names() for t in commands}
    ratio["files"] = files
    ratio["raw_tensor_counts"] = {t: len(n) for t, n in raw.items()}
    ratio["raw_layer0_expert_tensors"] = {t: sorted(n[len("model.layers.0."):] for n in names
                                                    if n.startswith("model.layers.0.") and "expert" in n)[:4]
                                          for t, names in raw.items()}
    cmp = compare_loaded(work / "workbench", work / "mergekit")
    ratio.update(cmp)
    if (cmp["max_abs_diff"] > MAX_ABS_DIFF or cmp["shape_mismatch"] or not cmp["tensors_compared"]
            or cmp["missing_in_workbench"] or cmp["missing_in_mergekit"]):
        failures.insert(0, f"max_abs_diff {cmp['max_abs_diff']:.3g} > {MAX_ABS_DIFF:g} (router "
                           f"{cmp['max_abs_diff_router']:.3g} at {cmp['worst_router']}, other weights "
                           f"{cmp['max_abs_diff_weights']:.3g} at {cmp['worst_weight']}; shape mismatches "
                           f"{cmp['shape_mismatch'][:3]}; missing {cmp['missing_in_workbench'][:3]} / "
                           f"{cmp['missing_in_mergekit'][:3]})")
    finish(case, ratio, failures)


@pytest.mark.timeout(3600)
def test_moe_random_gates(model_paths, work) -> None:
    moe_case("moe-random", "random", model_paths, work)


@pytest.mark.timeout(3600)
def test_moe_hidden_gates(model_paths, work) -> None:
    moe_case("moe-hidden", "hidden", model_paths, work)


# ---------------------------------------------------------------------------------------------
# LoRA extraction


def compare_adapters(ours: Path, theirs: Path) -> dict:
    """The A/B factors with each component's sign aligned, the singular values ||A_i||^2, and the
    other (full-rank) tensors exactly; the adapter configs' r/alpha/modules."""
    import torch

    a, b = Tensors(ours), Tensors(theirs)
    out = {"tensors_compared": 0, "pairs_compared": 0, "missing_in_workbench": sorted(b.names() - a.names()),
           "missing_in_mergekit": sorted(a.names() - b.names()), "shape_mismatch": [],
           "max_abs_diff_raw": 0.0, "max_abs_diff_factors": 0.0, "worst_factor": None,
           "max_abs_diff_singular_values": 0.0, "max_rel_diff_singular_values": 0.0,
           "max_abs_diff_full_rank": 0.0, "worst_full_rank": None, "max_abs_diff_product": 0.0, "sign_flips": 0}
    common = a.names() & b.names()
    for name in sorted(common):
        x, y = a.get(name).double(), b.get(name).double()
        if x.shape != y.shape:
            out["shape_mismatch"].append(f"{name} {list(x.shape)} vs {list(y.shape)}")
            continue
        out["tensors_compared"] += 1
        d = (x - y).abs().max().item() if x.numel() else 0.0
        out["max_abs_diff_raw"] = max(out["max_abs_diff_raw"], d)
        if ".lora_A." not in name and ".lora_B." not in name:
            if d > out["max_abs_diff_full_rank"] or out["worst_full_rank"] is None:
                out["max_abs_diff_full_rank"], out["worst_full_rank"] = d, name
    for name in sorted(n for n in common if ".lora_A." in n):
        bname = name.replace(".lora_A.", ".lora_B.")
        if bname not in common:
            continue
        A1, A2 = a.get(name).double(), b.get(name).double()
        B1, B2 = a.get(bname).double(), b.get(bname).double()
        if A1.shape != A2.shape or B1.shape != B2.shape:
            continue
        out["pairs_compared"] += 1
        sign = torch.sign((A1 * A2).sum(dim=1))
        sign[sign == 0] = 1
        out["sign_flips"] += int((sign < 0).sum())
        d = max((A1 * sign[:, None] - A2).abs().max().item(), (B1 * sign[None, :] - B2).abs().max().item())
        if d > out["max_abs_diff_factors"] or out["worst_factor"] is None:
            out["max_abs_diff_factors"], out["worst_factor"] = d, name
        s1, s2 = (A1 ** 2).sum(dim=1), (A2 ** 2).sum(dim=1)
        out["max_abs_diff_singular_values"] = max(out["max_abs_diff_singular_values"], (s1 - s2).abs().max().item())
        out["max_rel_diff_singular_values"] = max(out["max_rel_diff_singular_values"],
                                                  ((s1 - s2).abs() / s2.abs().clamp(min=1e-30)).max().item())
        out["max_abs_diff_product"] = max(out["max_abs_diff_product"], (B1 @ A1 - B2 @ A2).abs().max().item())
    ca = json.loads((ours / "adapter_config.json").read_text())
    cb = json.loads((theirs / "adapter_config.json").read_text())
    out["config"] = {k: [ca.get(k), cb.get(k)] for k in ("r", "lora_alpha")}
    out["config"]["modules_to_save_count"] = [len(ca.get("modules_to_save") or []), len(cb.get("modules_to_save") or [])]
    out["config"]["target_modules"] = [sorted(ca.get("target_modules") or []), sorted(cb.get("target_modules") or [])]
    out["config_rank_pattern_equal"] = (ca.get("rank_pattern") or {}) == (cb.get("rank_pattern") or {})
    return out


@pytest.mark.timeout(3600)
def test_extract_lora(model_paths, work) -> None:
    case = "extract-lora"
    selected(case)
    base, ft = model_paths["base"], model_paths["variant-a"]
    commands = {
        "workbench": [str(VENV_BIN / "workbench"), "extract-lora", str(base), str(ft), "--rank", str(EXTRACT_RANK),
                      "--out", str(work / "workbench"), "--no-progress"],
        "mergekit": [str(mergekit_bin("mergekit-extract-lora")), "--model", str(ft), "--base-model", str(base),
                     "--out-path", str(work / "mergekit"), "--max-rank", str(EXTRACT_RANK), "--lazy-unpickle",
                     "--quiet"],
    }
    ratio, failures = run_and_report(case, commands, {t: [work / t] for t in commands}, work, judge_rss=False)
    cmp = compare_adapters(work / "workbench", work / "mergekit")
    ratio.update(cmp)
    worst = max(cmp["max_abs_diff_factors"], cmp["max_abs_diff_singular_values"], cmp["max_abs_diff_full_rank"])
    ratio["max_abs_diff"] = worst
    if (worst > EXTRACT_MAX_ABS_DIFF or cmp["shape_mismatch"] or not cmp["pairs_compared"]
            or cmp["missing_in_workbench"] or cmp["missing_in_mergekit"]):
        failures.insert(0, f"max_abs_diff {worst:.3g} > {EXTRACT_MAX_ABS_DIFF:g} (factors "
                           f"{cmp['max_abs_diff_factors']:.3g} at {cmp['worst_factor']}, singular values "
                           f"{cmp['max_abs_diff_singular_values']:.3g}, full-rank {cmp['max_abs_diff_full_rank']:.3g} "
                           f"at {cmp['worst_full_rank']}; shape mismatches {cmp['shape_mismatch'][:3]}; missing "
                           f"{cmp['missing_in_workbench'][:3]} / {cmp['missing_in_mergekit'][:3]})")
    finish(case, ratio, failures)
