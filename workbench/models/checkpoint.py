"""Lazy access to a Hugging Face model directory, one tensor at a time.

Only safetensors are read. Pickled checkpoints (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``)
are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.models.safetensors_io import NAME_DTYPES, SafetensorsFile, read_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_DTYPES = NAME_DTYPES
# Decoder layers are named `...layers.N.` (Llama, Qwen2, Mistral) or `...h.N.` (GPT-2).
LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks))\.(?P<index>\d+)\.(?P<rest>.+)$")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
INDEX_NAME = "model.safetensors.index.json"


class ModelLoadError(WorkbenchError, ValueError):
    """A model directory that cannot be read; the message names the path and what is wrong."""


def layer_index(tensor_name: str) -> int | None:
    """The decoder-layer index in a tensor name, or None for embeddings, final norm, head."""
    m = LAYER_RE.match(tensor_name)
    return int(m.group("index")) if m else None


def rename_layer(tensor_name: str, new_index: int) -> str:
    m = LAYER_RE.match(tensor_name)
    if not m:
        raise ValueError(f"{tensor_name!r} is not a layer tensor")
    return f"{m.group('prefix')}.{new_index}.{m.group('rest')}"


def index_weight_map(path: Path) -> dict[str, Path] | None:
    """Tensor name -> shard file from ``model.safetensors.index.json``, or None without an index."""
    index = path / INDEX_NAME
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{index}: not a safetensors index (missing 'weight_map': {e})") from None
    missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
    if missing:
        raise ModelLoadError(f"{index}: shard files listed but missing: {', '.join(missing)}")
    return {name: path / f for name, f in weight_map.items()}


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory: the index's shards, or every ``*.safetensors``."""
    weight_map = index_weight_map(path)
    files = sorted(set(weight_map.values())) if weight_map is not None else sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ModelLoadError(
            f"{path}: only pickled weights ({', '.join(pickled)}); workbench never unpickles "
            "model files. Convert them to safetensors on a machine you trust, e.g. "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`."
        )
    raise ModelLoadError(f"{path}: no *.safetensors weights found")


def check_weight_files(model: str | Path) -> None:
    """Check that a model's weight files are whole, before any work reads them: each safetensors
    header against its file's size (headers only; no tensor data is read), or a ``.gguf`` file's
    tensor ranges. Raises :class:`ModelLoadError` naming the file, the tensor and the bytes."""
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        from workbench.models.gguf_import import check_gguf_file

        try:
            check_gguf_file(path)
        except WorkbenchError as e:
            raise ModelLoadError(str(e)) from None
        return
    for f in weight_files(path):
        try:
            read_header(f)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None


def load_training_state(path: str | Path) -> dict:
    """A training checkpoint (recovery's, the zoo's) through torch's weights-only unpickler: tensors,
    numbers, strings and containers load; anything that would construct another object (and so
    could run code) is refused, with the file named. Such a file is never ours: delete it to restart."""
    import pickle

    try:
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        named = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "global" in ln]
        why = named[0][:160] if named else type(e).__name__   # e.g. "Unsupported global: GLOBAL pathlib.Path.touch"
        raise WorkbenchError(f"{path}: not a checkpoint the workbench wrote, refused unread (it would construct "
                             f"other objects than tensors and plain values: {why}); delete it to start over") from None
    if not isinstance(state, dict):
        raise WorkbenchError(f"{path}: not a checkpoint the workbench wrote (a {type(state).__name__}, "
                             "expected a mapping); delete it to start over")
    return state


class ModelDir:
    """A model directory: ``config.json`` plus single or sharded safetensors.

    Opening a model reads only the file headers, and checks each against its file's size (a
    cut-short download is refused here, naming the file and tensor); each tensor is read on demand
    into its own buffer (see ``safetensors_io``), so memory holds only the tensors in use.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix == ".gguf" and self.path.is_file():
            raise ModelLoadError(
                f"{self.path} is a GGUF file; import it first: "
                f"`workbench models import-gguf {self.path} OUT_DIR`"
            )
        if not self.path.is_dir():
            raise ModelLoadError(f"{self.path}: no such model directory")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise ModelLoadError(f"{self.path}: missing config.json (expected a Hugging Face model directory)")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{config_path}: invalid JSON ({e})") from None
        self._handles: dict[Path, SafetensorsFile] = {}
        self._files = self._find_weight_files()

    def _find_weight_files(self) -> dict[str, Path]:
        """Map each tensor name to the safetensors file that holds it. Every file is opened, so
        its header is checked against its size (see ``safetensors_io.check_header``) here."""
        weight_map = index_weight_map(self.path)
        if weight_map is None:
            return {name: f for f in weight_files(self.path) for name in self._handle(f).keys()}
        for name, f in weight_map.items():
            if name not in self._handle(f).header:
                raise ModelLoadError(f"{self.path / INDEX_NAME}: lists tensor {name!r} in {f.name}, "
                                     "which does not hold it")
        return weight_map

    def _handle(self, f: Path) -> SafetensorsFile:
        if f not in self._handles:
            try:
                self._handles[f] = SafetensorsFile(f)
            except ValueError as e:
                raise ModelLoadError(str(e)) from None
        return self._handles[f]

    @property
    def source_id(self) -> str:
        """The model as a recipe names it by absolute path (a LoRA model names base and adapter)."""
        return str(self.path)

    # --- tensors -------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        return self._handle(self._files[name]).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self._handle(self._files[name]).dtype(name)

    def get_tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        if name not in self._files:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        t = self._handle(self._files[name]).get_tensor(name)
        return t.to(device) if str(device) != "cpu" else t

    # --- config --------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "unknown")]
        return archs[0]

    @property
    def num_layers(self) -> int:
        for key in LAYER_COUNT_KEYS:
            if key in self.config:
                return int(self.config[key])
        indices = {layer_index(n) for n in self._files} - {None}
        return max(indices) + 1 if indices else 0

    @cached_property
    def num_parameters(self) -> int:
        total = 0
        for name in self._files:
            n = 1
            for d in self.shape(name):
                n *= d
            total += n
        return total

    def close(self) -> None:
        for h in self._handles.values():
            h.close()

    def __enter__(self) -> "ModelDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r}, {self.architecture}, {len(self._files)} tensors)"
