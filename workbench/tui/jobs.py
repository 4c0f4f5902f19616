"""What the screens' workers call: thin wrappers over the library (the same calls as the CLI)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from workbench.errors import WorkbenchError


def error_text(e: BaseException) -> str:
    """One line for a notification: a WorkbenchError's own message, else the type and message."""
    if isinstance(e, WorkbenchError):
        return str(e)
    return f"{type(e).__name__}: {e}"


def error_line(message: str, source: str | None = None) -> int | None:
    """The 1-based line of a ``file:line: field: message`` error, if it names one."""
    if source and message.startswith(source + ":"):
        m = re.match(r"(\d+)\b", message[len(source) + 1:])
        return int(m.group(1)) if m else None
    m = re.search(r":(\d+): ", message)
    return int(m.group(1)) if m else None


def recipe_dirs() -> list[Path]:
    """``recipes/`` of the working directory and of the source checkout, if they exist."""
    here = Path.cwd() / "recipes"
    repo = Path(__file__).resolve().parents[2] / "recipes"
    return [d for d in dict.fromkeys([here, repo]) if d.is_dir()]


def example_specs() -> list[Path]:
    return [p for d in recipe_dirs() for p in sorted(d.glob("*-search.yml"))]


def example_recipes() -> list[Path]:
    return [p for d in recipe_dirs() for p in sorted(d.glob("*.yml")) if not p.name.endswith("-search.yml")]


def default_spec() -> Path | None:
    """recipes/zoo-quick-search.yml when the zoo is built (the spec needs its experts)."""
    try:
        from workbench.zoo.build import EXPERTS, is_built
    except ImportError:  # a checkout without the zoo
        return None
    if not all(is_built(name) for name in EXPERTS):
        return None
    return next((p for p in example_specs() if p.name == "zoo-quick-search.yml"), None)


def new_run_dir(runs_root: Path, spec_path: str | Path) -> Path:
    stem = Path(spec_path).name.removesuffix(".yml").removesuffix(".yaml").removesuffix("-search")
    base = Path(runs_root) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def recipe_for_source(path: str | Path):
    """A recipe file, or the best recipe of a search run directory (as `workbench recipe export`)."""
    from workbench.merge.recipe import load_recipe, recipe_from_dict
    from workbench.search.run import read_history
    from workbench.tui.runs import best_row

    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "history.jsonl").is_file():
            raise WorkbenchError(f"{path}: neither a recipe file nor a search run directory (no history.jsonl)")
        best = best_row(read_history(path))
        if best is None:
            raise WorkbenchError(f"{path}: no candidate has been scored yet")
        return recipe_from_dict(best["recipe"], source=str(path / "best.yml"))
    return load_recipe(path)


def run_merge(recipe, out: str | Path, overwrite: bool = False,
              on_tensor: Callable[[int, int, str], None] | None = None):
    """Plan and execute a merge (``workbench merge``), closing the plan's files either way."""
    from workbench.merge.executor import execute_merge
    from workbench.merge.plan import plan_merge

    plan = plan_merge(recipe)
    try:
        return execute_merge(plan, out, overwrite=overwrite, on_tensor=on_tensor)
    finally:
        plan.close()


def validate_recipe(recipe) -> str:
    """Plan the recipe against its models (``workbench recipe validate``); a one-line summary."""
    from workbench.merge.plan import plan_merge

    plan = plan_merge(recipe)
    try:
        return f"{recipe.merge_method}, {len(plan.tensors)} output tensors, {plan.num_layers} layers"
    finally:
        plan.close()


def default_merge_out(name: str) -> Path:
    from workbench.home import workbench_home

    return workbench_home() / "merges" / name


# --- quantization (the Quantize screen; the same calls as `workbench quantize/recover/export`) --------

QUANT_CONFIG_NAMES = ("2bit.yml", "ternary.yml")


def quant_configs() -> list[Path]:
    """The example quantization configs: recipes/2bit.yml, ternary.yml and mixed-*.yml."""
    return [p for d in recipe_dirs() for p in
            [d / n for n in QUANT_CONFIG_NAMES if (d / n).is_file()] + sorted(d.glob("mixed-*.yml"))]


def default_source_model() -> Path | None:
    """The default model's directory in the home, once `workbench models prepare-default` made it."""
    from workbench.home import default_model_dir

    path = default_model_dir()
    return path if (path / "config.json").is_file() else None


def default_quant_out(model: str, config: str | Path) -> Path:
    from workbench.home import workbench_home

    return workbench_home() / "quantized" / f"{model}-{Path(config).stem}"


def default_quant_export_out(qdir: Path, fmt: str) -> Path:
    """Next to the compressed directory: ``<qdir>-<fmt>`` (``<qdir>.gguf`` for GGUF)."""
    return qdir.with_name(qdir.name + (".gguf" if fmt == "gguf" else f"-{fmt}"))
