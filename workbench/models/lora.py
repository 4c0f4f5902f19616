"""LoRA adapters as merge inputs: mergekit's ``MODEL+ADAPTER`` model references.

``path/to/base+path/to/adapter`` names a base model plus a peft LoRA adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``; a pickled ``adapter_model.bin`` is never
read). It can stand wherever a recipe or a search spec names a model. mergekit merges the
adapter into a cached full copy on disk (``merge_and_unload``); here nothing is written: the
model is the base :class:`~workbench.models.checkpoint.ModelDir` whose ``get_tensor(W)`` reads
``W`` from the base and adds the adapter's update for it, one tensor at a time, as peft's
``merge_and_unload`` computes it:

- a LoRA pair ``lora_A`` (r x in), ``lora_B`` (out x r): ``W += scale * B @ A``, transposed for a
  transformers ``Conv1D`` (GPT-2; peft's ``fan_in_fan_out``), with ``scale = alpha / r``
  (``alpha / sqrt(r)`` with ``use_rslora``) and ``r``/``alpha`` per module from ``rank_pattern`` /
  ``alpha_pattern`` as peft matches them (a key matches a module name that ends in it);
- ``lora_embedding_A`` (r x vocab), ``lora_embedding_B`` (dim x r): ``E += scale * (B @ A).T``;
- ``lora_B.bias`` (peft's ``lora_bias``): ``b += scale * bias``;
- a ``modules_to_save`` tensor: replaces the base's tensor.

Everything is checked when the model is opened, before any merging: the adapter's files, its
config (LoRA, not DoRA), and that every tensor it holds fits a tensor of the base (the error
names the adapter tensor and both shapes).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.models.checkpoint import PICKLE_SUFFIXES, ModelDir, ModelLoadError
from workbench.models.safetensors_io import SafetensorsFile

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraRef:
    """A resolved ``BASE+ADAPTER`` reference: both parts as paths. ``str()`` is mergekit's form."""

    base: Path
    adapter: Path

    def __str__(self) -> str:
        return f"{self.base}+{self.adapter}"

    def absolute(self) -> "LoraRef":
        return LoraRef(self.base.absolute(), self.adapter.absolute())


def split_lora_ref(ref: str) -> tuple[str, str]:
    """``(base, adapter)`` of a ``BASE+ADAPTER`` reference (mergekit's rule: split at the ``+``)."""
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise WorkbenchError(f"model {ref!r}: a LoRA reference is BASE+ADAPTER with one '+'; "
                             "a path that holds a '+' is written {model: {path: ...}}")
    return parts[0], parts[1]


def module_types(model_dir: str | Path) -> dict[str, str]:
    """Module name -> class name of the model a directory's config.json builds (on the meta device:
    no memory, no weights), as mergekit reads module types; {} when transformers cannot build it.
    ``<input_embeddings>`` / ``<output_embeddings>`` name the embedding modules."""
    cfg = Path(model_dir) / "config.json"
    return _module_types(str(model_dir), cfg.stat().st_mtime_ns if cfg.is_file() else 0)


@lru_cache(maxsize=16)
def _module_types(model_dir: str, _mtime: int) -> dict[str, str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:   # an architecture transformers does not know: callers fall back to the config
        return {}
    types = {name: type(m).__name__ for name, m in model.named_modules()}
    for key, emb in (("<input_embeddings>", model.get_input_embeddings()),
                     ("<output_embeddings>", model.get_output_embeddings())):
        name = next((n for n, m in model.named_modules() if m is emb), None) if emb is not None else None
        if name is not None:
            types[key] = name
    return types


def _pattern_value(pattern: dict, module: str, default):
    """peft's ``get_pattern_key``: the first key that the module name ends in (as a regex)."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return default


@dataclass
class _Update:
    kind: str            # "lora", "embedding", "bias", "replace"
    keys: tuple[str, ...]  # adapter tensor names (A, B) or (tensor,)
    scale: float = 1.0
    transpose: bool = False


@dataclass
class LoraAdapter:
    """A peft LoRA adapter directory, checked, with the update of each base tensor it changes."""

    path: Path
    config: dict = field(default_factory=dict)
    updates: dict[str, list[_Update]] = field(default_factory=dict)   # base tensor name -> updates

    @classmethod
    def open(cls, path: str | Path) -> "LoraAdapter":
        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"{path}: no such LoRA adapter directory")
        cfg_path = path / ADAPTER_CONFIG
        if not cfg_path.is_file():
            raise ModelLoadError(f"{path}: missing {ADAPTER_CONFIG} (expected a peft LoRA adapter directory)")
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickled:
                raise ModelLoadError(f"{path / pickled[0]}: pickled adapter weights are never read (unpickling runs "
                                     f"code); save the adapter with safetensors ({ADAPTER_WEIGHTS})")
            raise ModelLoadError(f"{path}: missing {ADAPTER_WEIGHTS}")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{cfg_path}: invalid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ModelLoadError(f"{cfg_path}: expected a JSON object")
        if config.get("peft_type", "LORA") != "LORA":
            raise ModelLoadError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not supported; "
                                 "expected a LoRA adapter (LORA)")
        if config.get("use_dora"):
            raise ModelLoadError(f"{cfg_path}: use_dora: DoRA adapters are not supported; expected a plain LoRA")
        try:
            st = SafetensorsFile(weights)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        return cls(path, config, {})._with_file(st)

    def _with_file(self, st: SafetensorsFile) -> "LoraAdapter":
        self.file = st
        return self

    def close(self) -> None:
        self.file.close()

    # --- the updates -------------------------------------------------------------------------
    def _scale(self, module: str, rank: int, key: str) -> float:
        cfg = self.config
        r = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
        if r != rank:
            raise ModelLoadError(f"{self.path / ADAPTER_WEIGHTS}: {key} has rank {rank}, but {ADAPTER_CONFIG} "
                                 f"gives {module} rank {r}")
        return alpha / (math.sqrt(r) if self.config.get("use_rslora") else r)

    def bind(self, base: ModelDir) -> None:
        """Work out, and check against ``base``, the update of every base tensor the adapter changes."""
        where = self.path / ADAPTER_WEIGHTS
        names = set(self.file.keys())
        types = module_types(str(base.path)) if any(".lora_" in n for n in names) else {}
        self._check_base_name(base)
        updates: dict[str, list[_Update]] = {}
        for key in sorted(names):
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
            m = re.fullmatch(r"(?P<mod>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                             r"(?:\.(?P<what>weight|bias))?", name)
            if m is None:
                if "lora_magnitude_vector" in name or "trainable_tokens" in name or ".lora_" in name:
                    raise ModelLoadError(f"{where}: tensor {key!r} is of a LoRA variant workbench does not apply "
                                         "(plain LoRA A/B pairs, lora_B biases and modules_to_save only)")
                self._need(base, key, name, self.file.shape(key))
                updates.setdefault(name, []).append(_Update("replace", (key,)))
                continue
            mod, kind, what = m["mod"], m["kind"], m["what"]
            def partner(new_kind: str, new_what: str | None = what) -> str:
                at = key.rfind(kind)
                return key[:at] + new_kind + (f".{new_what}" if new_what else "")

            if kind == "lora_B" and what == "bias":
                a_key = partner("lora_A", "weight")
                if a_key not in names:
                    raise ModelLoadError(f"{where}: {key} has no {a_key} beside it")
                scale = self._scale(mod, self.file.shape(a_key)[0], a_key)
                self._need(base, key, f"{mod}.bias", self.file.shape(key))
                updates.setdefault(f"{mod}.bias", []).append(_Update("bias", (key,), scale))
                continue
            if kind not in ("lora_A", "lora_embedding_A"):
                pair = partner(kind[:-1] + "A")
                if pair not in names:
                    raise ModelLoadError(f"{where}: {key} has no {pair} beside it")
                continue
            b_key = partner(kind[:-1] + "B")
            if b_key not in names:
                raise ModelLoadError(f"{where}: {key} has no {b_key} beside it")
            a_shape, b_shape = self.file.shape(key), self.file.shape(b_key)
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise ModelLoadError(f"{where}: {key} {list(a_shape)} and {b_key} {list(b_shape)} are not a LoRA "
                                     "pair of matrices (A: r x in, B: out x r); convolution LoRA is not supported")
            scale = self._scale(mod, a_shape[0], key)
            target = f"{mod}.weight"
            if kind == "lora_embedding_A":
                upd = _Update("embedding", (key, b_key), scale, transpose=True)
                shape = (a_shape[1], b_shape[0])
            else:
                conv1d = types.get(mod) == "Conv1D" if types else bool(self.config.get("fan_in_fan_out"))
                upd = _Update("lora", (key, b_key), scale, transpose=conv1d)
                shape = (a_shape[1], b_shape[0]) if conv1d else (b_shape[0], a_shape[1])
            self._need(base, f"{key} {list(a_shape)} with {b_key} {list(b_shape)}", target, shape, update=True)
            updates.setdefault(target, []).append(upd)
        for target, ups in updates.items():
            if sum(u.kind == "replace" for u in ups) and len(ups) > 1:
                raise ModelLoadError(f"{where}: {target} is both saved whole (modules_to_save) and adapted")
        self.updates = updates

    def _need(self, base: ModelDir, what: str, target: str, shape, update: bool = False) -> None:
        where = self.path / ADAPTER_WEIGHTS
        if target not in base:
            raise ModelLoadError(f"{where}: {what.split(' ')[0]!r} changes {target}, which the base {base.path} "
                                 "does not have (an adapter for another model?)")
        if tuple(base.shape(target)) != tuple(shape):
            made = "makes an update of shape" if update else "has shape"
            raise ModelLoadError(f"{where}: {what} {made} {list(shape)}, but {target} of the base {base.path} has "
                                 f"shape {list(base.shape(target))} (an adapter for another model?)")

    def _check_base_name(self, base: ModelDir) -> None:
        """``base_model_name_or_path``, when it is a local model directory, must be of the base's
        architecture (a hub name is not checked: the shapes are)."""
        named = self.config.get("base_model_name_or_path")
        if not isinstance(named, str) or not named:
            return
        cfg = Path(named).expanduser() / "config.json"
        try:
            other = json.loads(cfg.read_text()) if cfg.is_file() else None
        except (OSError, json.JSONDecodeError):
            other = None
        if not other:
            return
        arch = (other.get("architectures") or [other.get("model_type", "unknown")])[0]
        if arch != base.architecture:
            raise ModelLoadError(f"{self.path / ADAPTER_CONFIG}: base_model_name_or_path {named} is a {arch}, "
                                 f"but the base {base.path} is a {base.architecture}")

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the base's ``name``) with the adapter's updates, in float32 (float64 stays)."""
        ups = self.updates.get(name)
        if not ups:
            return tensor
        dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        out = tensor.to(dtype, copy=True)
        for u in ups:
            if u.kind == "replace":
                out = self.file.get_tensor(u.keys[0]).to(dtype, copy=True)
            elif u.kind == "bias":
                out += u.scale * self.file.get_tensor(u.keys[0]).to(dtype)
            else:
                a, b = (self.file.get_tensor(k).to(out.device, dtype) for k in u.keys)
                delta = (b @ a) * u.scale
                out += delta.T if u.transpose else delta
        return out


class LoraModelDir(ModelDir):
    """A base model with a LoRA adapter applied tensor by tensor (see the module's docstring).
    ``path`` is the base's (its config, tokenizer and files); ``source_id`` names both parts."""

    def __init__(self, ref: LoraRef):
        super().__init__(ref.base)
        self.ref = ref
        self.adapter = LoraAdapter.open(ref.adapter)
        try:
            self.adapter.bind(self)
        except BaseException:
            self.close()
            raise

    @property
    def source_id(self) -> str:
        return str(self.ref)

    def get_tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        t = self.adapter.apply(name, super().get_tensor(name))
        return t.to(device) if str(device) != "cpu" else t

    def close(self) -> None:
        super().close()
        if hasattr(self, "adapter"):
            self.adapter.close()

    def __repr__(self) -> str:
        return f"LoraModelDir({self.source_id!r}, {self.architecture}, {len(self.adapter.updates)} tensors adapted)"


def open_model_dir(path: Path | LoraRef) -> ModelDir:
    """A model a recipe names, opened: a model directory, or a base with a LoRA adapter."""
    return LoraModelDir(path) if isinstance(path, LoraRef) else ModelDir(path)


def resolve_ref(ref: str, relative_to: Path | None = None) -> Path | LoraRef:
    """A model reference, or ``BASE+ADAPTER``, resolved by the one rule of
    :func:`workbench.models.loader.model_candidates` (each part of a LoRA reference on its own)."""
    from workbench.models.loader import model_candidates

    def find(r: str) -> Path:
        found = next((c for c in model_candidates(r, relative_to) if c.exists()), None)
        if found is None:
            raise ModelLoadError(f"{r}: no such model or adapter (looked in: "
                                 f"{', '.join(str(c) for c in model_candidates(r, relative_to))})")
        return found.absolute()

    if "+" in str(ref) and not Path(str(ref)).expanduser().exists():
        base, adapter = split_lora_ref(str(ref))
        return LoraRef(find(base), find(adapter))
    return find(str(ref))
