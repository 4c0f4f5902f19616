"""Model actions: open a model (name or path -> model and tokenizer), import a GGUF, prepare the
default model, list and describe models. The one resolution rule lives in
:func:`workbench.models.loader.resolve_model`: an existing path wins, then ``$WORKBENCH_HOME/models/NAME``."""

from __future__ import annotations

from pathlib import Path

from workbench.progress import ProgressFn


def open_model(ref: str | Path, dtype: str = "float32"):
    """(model in eval mode, tokenizer) for a float directory, a compressed one or a GGUF file."""
    from workbench.models.loader import load_model

    return load_model(ref, dtype)


def resolve(ref: str | Path) -> Path:
    """The directory or GGUF file a model reference names (checked: weights present, never pickles)."""
    from workbench.models.loader import resolve_model

    return resolve_model(ref)


def import_gguf(gguf: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False,
                progress: ProgressFn | None = None) -> Path:
    """`workbench models import-gguf`: dequantize a GGUF into a safetensors directory, atomically."""
    from workbench.models.gguf_import import import_gguf as run

    return run(gguf, out, dtype=dtype, overwrite=overwrite, progress=progress)


def prepare_default(dtype: str = "float32", force: bool = False, progress: ProgressFn | None = None) -> Path:
    """`workbench models prepare-default`: SmolLM2-135M-Instruct into the home (once)."""
    from workbench.models.default_model import prepare_default as run

    return run(dtype=dtype, force=force, progress=progress)


def list_models(root: str | Path | None = None) -> list[dict]:
    """`workbench models list`: one row per model in the home (or ``root``)."""
    from workbench.models.info import list_models as run

    return run(root)


def model_info(path: str | Path) -> dict:
    """`workbench models info`: architecture, parameters, dtype, layers, stored bits."""
    from workbench.models.info import model_info as run

    return run(path)
