"""Helpers of the screens: error lines, example files, default output paths. The work itself is an
action of :mod:`workbench.ops`, run by ``WorkbenchScreen.run_job``."""

from __future__ import annotations

import re
import time
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
    """``recipes/`` of the working directory, of the source checkout and of the workbench home (the
    search over the default model's variants is written there), if they exist."""
    from workbench.home import workbench_home

    here = Path.cwd() / "recipes"
    repo = Path(__file__).resolve().parents[2] / "recipes"
    return [d for d in dict.fromkeys([here, repo, workbench_home() / "recipes"]) if d.is_dir()]


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
