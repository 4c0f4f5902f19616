"""The `mergekit_config.yml` that `workbench merge` writes, read by mergekit itself (the real client).

Run by `make bench` (pytest -s; skipped where mergekit is not installed). For each method a
recipe naming tiny random models by short names (resolved in a temporary ``WORKBENCH_HOME``) is
merged by `workbench merge`; then `mergekit-yaml OUT/mergekit_config.yml OUT2 --lazy-unpickle`
runs on the written config, from another directory and without the workbench home, so it can
only succeed if every model is named by an absolute path. The two outputs are compared tensor
by tensor; one JSON line per method:

    {"bench": "mergekit_config", "method": "ties", "tensors_compared": 39, "max_abs_diff": 0.0, ...}

Target: the same tensor names and shapes, max |workbench - mergekit| <= 1e-5.
Knob: BENCH_MERGEKIT_YAML (path of mergekit-yaml).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mergekit", reason="mergekit comes with the bench extra: make bench")

from conftest import save_tiny_model  # noqa: E402 (after the skip)

REPO = Path(__file__).resolve().parents[2]
MAX_ABS_DIFF = 1e-5
BASE, VAR_A, VAR_B = "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct-variant-a", "SmolLM2-135M-Instruct-variant-b"
RECIPES = {
    "ties": f"""\
merge_method: ties
base_model: {BASE}
models:
  - model: {VAR_A}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {VAR_B}
    parameters: {{weight: 0.4, density: [0.3, 0.7]}}
parameters: {{normalize: true}}
dtype: float32
""",
    "linear": f"""\
merge_method: linear
models:
  - model: {BASE}
    parameters:
      weight: [{{filter: mlp, value: 0.2}}, {{value: 0.5}}]
  - model: {VAR_A}
    parameters: {{weight: 0.5}}
dtype: float32
""",
    "passthrough": f"""\
merge_method: passthrough
slices:
  - sources: [{{model: {BASE}, layer_range: [0, 3]}}]
  - sources: [{{model: {VAR_A}, layer_range: [1, 4]}}]
dtype: float32
""",
}


def emit(**fields) -> None:
    print(json.dumps({"bench": "mergekit_config", **fields}), flush=True)


def mergekit_yaml() -> str:
    candidates = [os.environ.get("BENCH_MERGEKIT_YAML"), Path(sys.executable).parent / "mergekit-yaml",
                  REPO / ".venv-peers" / "bin" / "mergekit-yaml", shutil.which("mergekit-yaml")]
    for c in candidates:
        if c and Path(c).is_file():
            return str(c)
    pytest.fail("mergekit-yaml not found; `make bench` installs mergekit (the bench extra)")


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "WORKBENCH_HOME"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return time.perf_counter() - t0


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def compare(ours: Path, theirs: Path) -> dict:
    a, b = tensors(ours), tensors(theirs)
    common = sorted(a.keys() & b.keys())
    shape_mismatch = [n for n in common if a[n].shape != b[n].shape]
    diffs = [(a[n].double() - b[n].double()).abs().max().item() for n in common if n not in shape_mismatch]
    return {"tensors_compared": len(common), "max_abs_diff": max(diffs, default=float("inf")),
            "missing_in_workbench": sorted(b.keys() - a.keys()), "missing_in_mergekit": sorted(a.keys() - b.keys()),
            "shape_mismatch": shape_mismatch}


def make_home(path: Path) -> Path:
    """A workbench home whose models/ holds tiny random models under the recipes' short names."""
    base = save_tiny_model(path / "models" / BASE, "llama", seed=0)
    save_tiny_model(path / "models" / VAR_A, base=base, seed=1)
    save_tiny_model(path / "models" / VAR_B, base=base, seed=2)
    return path


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return make_home(tmp_path_factory.mktemp("wb-home"))


def merge_both(method: str, home: Path, tmp_path: Path, **fields) -> None:
    """`workbench merge` by short names, then `mergekit-yaml` on its mergekit_config.yml; compare."""
    import yaml

    recipe = tmp_path / "recipes" / f"{method}.yml"
    recipe.parent.mkdir()
    recipe.write_text(RECIPES[method])
    ours, theirs, elsewhere = tmp_path / "workbench", tmp_path / "mergekit", tmp_path / "elsewhere"
    elsewhere.mkdir()
    wb_s = run([sys.executable, "-m", "workbench.cli", "merge", str(recipe), str(ours), "--no-progress"],
               cwd=tmp_path, env=child_env(WORKBENCH_HOME=str(home)))
    config = ours / "mergekit_config.yml"
    refs = workbench_refs(yaml.safe_load(config.read_text()))
    assert refs and all(Path(r).is_absolute() and Path(r).is_dir() for r in refs), refs
    mk_s = run([mergekit_yaml(), str(config), str(theirs), "--lazy-unpickle"], cwd=elsewhere, env=child_env())
    cmp = compare(ours, theirs)
    emit(method=method, **fields, workbench_s=round(wb_s, 2), mergekit_s=round(mk_s, 2), **cmp)
    assert cmp["tensors_compared"] and not cmp["missing_in_workbench"] and not cmp["missing_in_mergekit"], cmp
    assert not cmp["shape_mismatch"] and cmp["max_abs_diff"] <= MAX_ABS_DIFF, cmp


def workbench_refs(doc: dict) -> list[str]:
    """The model paths of a written config, read as workbench reads them."""
    from workbench.merge.recipe import recipe_from_dict

    return recipe_from_dict(doc).referenced_models()


@pytest.mark.parametrize("method", list(RECIPES))
def test_mergekit_reads_the_written_config(method: str, home: Path, tmp_path: Path) -> None:
    merge_both(method, home, tmp_path)


def test_mergekit_reads_paths_with_plus_and_at(tmp_path_factory, tmp_path: Path) -> None:
    """mergekit reads ``a+b`` as a model plus a LoRA and ``a@r`` as a revision: such paths are
    written as ``{model: {path: ...}}``."""
    home = make_home(tmp_path_factory.mktemp("wb-home") / "home+lora@rev")
    merge_both("ties", home, tmp_path, home_dir="home+lora@rev")
