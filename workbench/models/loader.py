"""The one way every command turns a model reference into (model, tokenizer).

A reference is a path or a name in the workbench home's ``models/`` (one rule, `model_candidates`:
an existing path wins, then one relative to the file that names it, then ``$WORKBENCH_HOME/models/NAME``). What it points at is loaded as what it is:

- a float model directory (``config.json`` + safetensors): transformers, and every weight the
  architecture has must be in the files; a missing one is an error naming it (transformers would
  initialise it at random and carry on: a compressed directory "evaluated" that way scored
  perplexity 2.5e18);
- a compressed quantized directory (``quant_config.json``, from ``workbench quantize`` or
  ``recover``): rebuilt with its ``QuantLinear`` layers and adapters;
- a ``.gguf`` file: dequantized once into the home's cache (``cache/gguf/``), then loaded from there.

Pickled checkpoints are never read.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.models.checkpoint import PICKLE_SUFFIXES, ModelLoadError

DTYPES = ("float32", "bfloat16", "float16")


def model_candidates(ref: str | Path, relative_to: Path | None = None) -> list[Path]:
    """Where a model reference may be, in the order tried: the path as written, then (for a
    reference in a file: a recipe, a spec) relative to that file's directory, then
    ``$WORKBENCH_HOME/models/NAME``. The one rule every command follows."""
    from workbench.home import models_dir

    path = Path(ref).expanduser()
    if path.is_absolute():
        return [path]
    return [path] + ([relative_to / path] if relative_to is not None else []) + [models_dir() / str(ref)]


def resolve_model(ref: str | Path, relative_to: Path | None = None) -> Path:
    """The model directory or GGUF file a reference names (see :func:`model_candidates`), checked:
    a directory with config.json and safetensors weights (pickled weights are never read), or a .gguf."""
    from workbench.home import models_dir

    path = next((c for c in model_candidates(ref, relative_to) if c.exists()), Path(ref).expanduser())
    if path.is_file() and path.suffix == ".gguf":
        return path
    if not path.exists():
        raise ModelLoadError(f"{ref}: no such model (neither a path nor a name in {models_dir()})")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a model directory (no config.json) nor a .gguf file")
    if not any(p.name.endswith(".safetensors") for p in path.iterdir()):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f"only pickled weights ({', '.join(pickled)}), which are never read" if pickled else "no weights"
        raise ModelLoadError(f"{path}: no .safetensors weights: {found}")
    return path


def model_kind(path: Path) -> str:
    """'gguf', 'quantized' (a compressed workbench directory) or 'float'."""
    if path.is_file():
        return "gguf"
    return "quantized" if (path / "quant_config.json").is_file() else "float"


def load_model(ref: str | Path, dtype: str = "float32", progress=None):
    """(model in eval mode, tokenizer) for any model reference, loaded as what it is (``progress``:
    the one-time import of a GGUF file)."""
    import torch
    from transformers import AutoTokenizer

    if dtype not in DTYPES:
        raise WorkbenchError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    path = resolve_model(ref)
    kind = model_kind(path)
    if kind == "gguf":
        from workbench.models.gguf_import import cached_import

        path = cached_import(path, progress)
        kind = "float"
    torch_dtype = getattr(torch, dtype)
    if kind == "quantized":
        from workbench.quant.model import load_quantized

        model = load_quantized(path, torch_dtype)
    else:
        model = _load_float(path, torch_dtype)
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


@contextlib.contextmanager
def quiet_transformers():
    """transformers' own progress bars off while a block runs ("Loading weights", "Writing model
    shards"): every command shows its own progress."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _load_float(path: Path, torch_dtype):
    from transformers import AutoModelForCausalLM

    with quiet_transformers():   # its "Loading weights" bar: our commands show their own progress
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True,
                                                           output_loading_info=True)
    missing = set(info.get("missing_keys", []))
    for group in _tied_groups(model):
        if group - missing:  # one stored member holds the weights of the whole tied group
            missing -= group
    missing = sorted(missing)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ModelLoadError(f"{path}: the weights do not cover the model: {len(missing)} tensors missing "
                             f"({shown})")
    return model


def _tied_groups(model) -> list[set[str]]:
    """Names of parameters that share storage (a tied head): storing one of them is enough."""
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(p.data_ptr(), set()).add(name)
    return [g for g in groups.values() if len(g) > 1]


def check_finite(model, source: str | Path, flag: str = "--allow-nonfinite") -> None:
    """Refuse a model holding NaN or inf in a weight, naming the first such tensor: one sum per
    tensor (a sum is non-finite if an entry is; an overflowing sum is told apart by counting)."""
    import torch

    for name, p in model.named_parameters():
        if bool(torch.isfinite(p.detach().float().sum())):
            continue
        n = int((~torch.isfinite(p.detach())).sum())
        if n:
            raise ModelLoadError(f"{source}: tensor {name!r} holds {n} non-finite values (NaN/inf); "
                                 f"pass {flag} to go on anyway")
