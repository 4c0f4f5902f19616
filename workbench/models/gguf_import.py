"""Import a GGUF file as a plain Hugging Face safetensors model directory (dequantized).

transformers reads the GGUF (config, tokenizer and weights, dequantizing quantized blocks),
but refuses ``save_pretrained`` on a GGUF-loaded model, so the directory is written here:
``model.safetensors`` (tied weights stored once), a ``config.json`` with the GGUF-specific
leftovers removed, ``generation_config.json`` and the tokenizer files with the chat template.
The result loads with a plain ``AutoModelForCausalLM.from_pretrained(out_dir)``.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator

from workbench.errors import WorkbenchError
from workbench.progress import ProgressFn, emit

GGUF_MAGIC = b"GGUF"
DTYPES = ("float32", "bfloat16", "float16")
# Config keys that only describe the GGUF source; left in config.json they would make a later
# plain `from_pretrained(out_dir)` look for a GGUF file or a quantizer.
GGUF_CONFIG_LEFTOVERS = ("quantization_config", "_model_name_or_path", "_name_or_path", "gguf_file")
TOKENIZER_CONFIG_LEFTOVERS = ("gguf_file", "vocab_file", "name_or_path", "is_local", "local_files_only")


class GGUFImportError(WorkbenchError, ValueError):
    """A GGUF file that cannot be imported; the message names the file and what was expected."""


def check_gguf_file(path: str | Path) -> Path:
    """The path, if it is an existing GGUF file (magic bytes) whose every tensor's data lies
    within the file: a cut-short download is named with its first tensor past the end."""
    path = Path(path)
    if not path.exists():
        raise GGUFImportError(f"{path}: no such file (expected a .gguf model file)")
    if not path.is_file():
        raise GGUFImportError(f"{path}: not a file (expected a .gguf model file)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFImportError(
            f"{path}: not a GGUF file (expected the magic bytes {GGUF_MAGIC!r} at the start, found {magic!r})"
        )
    _check_tensor_ranges(path, _tensor_ranges(path))
    return path


def _tensor_ranges(path: Path) -> list[tuple[str, int, int]]:
    """``(name, first byte, end byte)`` of every tensor's data, from the GGUF metadata only."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class RangeReader(GGUFReader):
        """Records where each tensor's data lies instead of mapping it (which fails, unnamed, past
        the end of a cut-short file)."""

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            self.ranges = []
            for field in fields:
                _, name, _, dims, raw_dtype, offset = field.parts
                block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_dtype[0]))]
                n_elems = 1
                for d in dims.tolist():
                    n_elems *= int(d)
                begin = start_offs + int(offset[0])
                self.ranges.append((bytes(name).decode("utf-8", "replace"), begin,
                                    begin + n_elems * type_size // block_size))

    size = path.stat().st_size
    try:
        return RangeReader(path).ranges
    except Exception as e:  # metadata cut short or corrupt: the reader fails in many ways
        raise GGUFImportError(f"{path}: unreadable GGUF metadata ({size} bytes; cut short or corrupt?): "
                              f"{type(e).__name__}: {e}") from None


def _check_tensor_ranges(path: Path, ranges: list[tuple[str, int, int]]) -> None:
    size = path.stat().st_size
    past = sorted((begin, end, name) for name, begin, end in ranges if end > size)
    if past:
        begin, end, name = past[0]
        more = f" (and {len(past) - 1} more tensors after it)" if len(past) > 1 else ""
        raise GGUFImportError(
            f"{path}: cut short (an incomplete download?): the file has {size} bytes, its tensors need "
            f"{max(e for _, _, e in ranges)}; tensor {name!r} needs bytes {begin}..{end}{more}")


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file, read from its metadata only."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # a truncated or corrupt file
        raise GGUFImportError(f"{path}: unreadable GGUF file ({type(e).__name__}: {e})") from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFImportError(f"{path}: GGUF metadata has no 'general.architecture' key")
    return str(field.contents())


def supported_architectures() -> set[str] | None:
    """GGUF architectures this transformers version can load, or None if it cannot tell."""
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return None
    archs = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    try:
        from transformers.integrations.gguf.utils import GGUF_ARCHS

        archs |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return archs


def load_gguf_with_transformers(gguf_path: str | Path, dtype: str = "float32", tokenizer: bool = True):
    """``(model, tokenizer)`` loaded by transformers from a GGUF file, dequantized to ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).absolute()
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=getattr(torch, dtype))
    model.eval()
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name) if tokenizer else None
    return model, tok


class _Stages:
    """Named stages of an import as Progress events: stage = the title, done/total = stages; the
    tensors within a stage as a stage of their own."""

    def __init__(self, title: str, total: int, progress: ProgressFn | None):
        self.title, self.total, self.progress, self.step = title, total, progress, 0
        self.what, self.items_total, self.items_done = "", 0, 0

    def __enter__(self) -> "_Stages":
        return self

    def next(self, what: str) -> None:
        """Start the next stage."""
        emit(self.progress, self.title, self.step, self.total, what)
        self.step += 1

    def items(self, total: int, what: str) -> None:
        """Count ``total`` items within the current stage (see ``item``)."""
        self.what, self.items_total, self.items_done = what, total, 0
        emit(self.progress, what, 0, total)

    def item(self) -> None:
        self.items_done += 1
        emit(self.progress, self.what, self.items_done, self.items_total)

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            emit(self.progress, self.title, self.total, self.total, "done")


@contextlib.contextmanager
def _transformers_progress_to(stages: _Stages) -> Iterator[None]:
    """Route transformers' own GGUF progress (tqdm bars) into ``stages``, and silence its bars and
    its warnings (which speak of packed GGUF kernels; the import dequantizes everything)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    module, original = None, None
    with contextlib.suppress(ImportError):
        import transformers.modeling_gguf_pytorch_utils as module  # the legacy dequantizing loader
    if module is not None and hasattr(module, "tqdm"):
        original = module.tqdm

        def counted(iterable, *args, **kwargs):
            items = list(iterable)
            stages.items(len(items), kwargs.get("desc") or "tensors")
            for x in items:
                yield x
                stages.item()

        module.tqdm = counted
    try:
        yield
    finally:
        if original is not None:
            module.tqdm = original
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def _state_dict_to_save(model) -> dict:
    """Contiguous tensors, each storage once: tied weights (the LM head) are dropped."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        for name in _tied_names(model):
            state.pop(name, None)
    tensors, seen = {}, {}
    for name, t in state.items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ptr in seen:
            raise GGUFImportError(f"tensor {name!r} shares memory with {seen[ptr]!r} but is not a tied weight")
        seen[ptr] = name
        tensors[name] = t.detach().contiguous()
    return tensors


def _tied_names(model) -> set[str]:
    names = {"lm_head.weight"}
    tied = getattr(model, "_tied_weights_keys", None)
    if isinstance(tied, dict):
        names |= set(tied)
    elif isinstance(tied, (list, tuple)):
        names |= set(tied)
    return names


def _write_config(model, out: Path, dtype: str) -> None:
    config = model.config
    config.architectures = [type(model).__name__]
    for key in GGUF_CONFIG_LEFTOVERS:
        if hasattr(config, key):
            with contextlib.suppress(AttributeError):
                delattr(config, key)
    config.save_pretrained(out)
    path = out / "config.json"
    data = json.loads(path.read_text())
    for key in GGUF_CONFIG_LEFTOVERS:
        data.pop(key, None)
    data["architectures"] = [type(model).__name__]
    data["dtype"] = dtype
    data["torch_dtype"] = dtype  # the key older transformers read
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_generation_config(model, out: Path) -> None:
    from transformers import GenerationConfig

    gen = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    gen.save_pretrained(out)


def _write_tokenizer(tokenizer, out: Path) -> None:
    try:
        tokenizer.save_pretrained(out, save_jinja_files=False)
    except TypeError:  # older transformers: the chat template always goes into tokenizer_config.json
        tokenizer.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in TOKENIZER_CONFIG_LEFTOVERS:
        cfg.pop(key, None)
    if getattr(tokenizer, "chat_template", None) and "chat_template" not in cfg:
        cfg["chat_template"] = tokenizer.chat_template
        with contextlib.suppress(FileNotFoundError):
            (out / "chat_template.jinja").unlink()
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if not (out / "tokenizer.json").is_file():
        raise GGUFImportError(f"{out}: the tokenizer from the GGUF file was not saved as tokenizer.json")


def import_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32",
                overwrite: bool = False, progress: ProgressFn | None = None) -> Path:
    """Dequantize ``gguf_path`` into a safetensors model directory ``out_dir``; return its path.

    The directory is written to a temporary sibling and renamed into place when complete.
    """
    from workbench.atomic import atomic_dir, check_output

    gguf_path = check_gguf_file(gguf_path).absolute()
    out_dir = Path(out_dir).absolute()
    if dtype not in DTYPES:
        raise GGUFImportError(f"dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    check_output(out_dir, overwrite)

    with _Stages(f"import {gguf_path.name}", total=5, progress=progress) as stages:
        stages.next("reading GGUF metadata")
        arch = gguf_architecture(gguf_path)
        supported = supported_architectures()
        if supported is not None and arch not in supported:
            raise GGUFImportError(
                f"{gguf_path}: GGUF architecture {arch!r} is not supported by this transformers version "
                f"(expected one of: {', '.join(sorted(supported))})"
            )
        stages.next("loading and dequantizing weights")
        with _transformers_progress_to(stages):
            try:
                model, _ = load_gguf_with_transformers(gguf_path, dtype=dtype, tokenizer=False)
            except (ValueError, KeyError, NotImplementedError) as e:
                raise GGUFImportError(f"{gguf_path}: transformers could not load it ({e})") from None
            stages.next("loading tokenizer")
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            except (ValueError, KeyError, NotImplementedError) as e:
                raise GGUFImportError(f"{gguf_path}: transformers could not read its tokenizer ({e})") from None

        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            stages.next("writing model.safetensors")
            from safetensors.torch import save_file

            save_file(_state_dict_to_save(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            stages.next("writing config and tokenizer")
            _write_config(model, tmp, dtype)
            _write_generation_config(model, tmp)
            _write_tokenizer(tokenizer, tmp)
    return out_dir


def gguf_cache_dir(gguf_path: str | Path) -> Path:
    """Where :func:`cached_import` keeps the import of a GGUF file: ``$WORKBENCH_HOME/cache/gguf/``,
    keyed by the file's absolute path, size, mtime and its first and last MiB (a changed or
    replaced file gets a new import; a 4 GB file is not hashed whole)."""
    import hashlib

    from workbench.home import workbench_home

    path = Path(gguf_path).absolute()
    st = path.stat()
    h = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, st.st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return workbench_home() / "cache" / "gguf" / f"{path.stem}-{h.hexdigest()[:16]}"


def cached_import(gguf_path: str | Path, progress: ProgressFn | None = None) -> Path:
    """A GGUF file as a float32 safetensors directory, imported once into the home's cache and reused
    (``workbench eval FILE.gguf``, a GGUF picked in the UI)."""
    path = check_gguf_file(gguf_path).absolute()
    out = gguf_cache_dir(path)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return import_gguf(path, out, dtype="float32", overwrite=out.exists(), progress=progress)
