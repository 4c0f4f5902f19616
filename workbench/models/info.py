"""What a model is: architecture, parameters, dtypes, layers, size. For safetensors model
directories (read through ``ModelDir``, headers only), compressed directories of `workbench quantize`
(quant_config.json: formats per layer, bits per weight from the stored bytes, adapters, kernel
paths) and GGUF files (metadata only, nothing dequantized), and a listing of the models in the
workbench home."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from workbench.errors import WorkbenchError

HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model")
QUANT_FORMAT = "workbench.quant"  # quant_config.json's "format" (workbench.quant.model.FORMAT)
BASE_LEAVES = ("qweight", "scale", "zero")  # a quantized layer's base weight: codes, scales, zeros
ADAPTER_LEAVES = ("lora_A", "lora_B")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# Fields shown in the table, in order, with their headers (JSON gets every field).
TABLE_COLUMNS = (
    ("name", "Name"), ("format", "Format"), ("model_type", "Type"), ("parameters", "Params"),
    ("dtype", "Dtype"), ("layers", "Layers"), ("hidden_size", "Hidden"), ("vocab_size", "Vocab"),
    ("bytes", "Size"), ("tied_embeddings", "Tied"), ("path", "Path"),
)


class ModelInfoError(WorkbenchError, ValueError):
    """A path that is neither a model directory nor a GGUF file."""


def _bytes_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def model_info(path: str | Path) -> dict:
    """A JSON-ready description of a model directory or a ``.gguf`` file."""
    path = Path(path)
    if not path.exists():
        raise ModelInfoError(f"{path}: no such model directory or .gguf file")
    if _is_gguf_file(path):
        return gguf_info(path)
    if path.is_file():
        raise ModelInfoError(f"{path}: not a model directory or a .gguf file")
    return _dir_info(path)


def read_quant_meta(path: Path) -> dict | None:
    """The quant_config.json of a compressed directory, or None for a plain model directory."""
    meta_path = path / "quant_config.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelInfoError(f"{meta_path}: invalid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != QUANT_FORMAT:
        return None
    if not isinstance(meta.get("layers"), dict):
        raise ModelInfoError(f"{meta_path}: no `layers` mapping")
    return meta


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _dir_info(path: Path) -> dict:
    from workbench.models.checkpoint import ModelDir

    meta = read_quant_meta(path)
    with ModelDir(path) as model:
        config = model.config
        if not isinstance(config, dict):
            raise ModelInfoError(f"{path / 'config.json'}: expected a JSON object")
        names = model.tensor_names()
        by_dtype: Counter = Counter()
        for name in names:
            n = 1
            for d in model.shape(name):
                n *= d
            by_dtype[_dtype_name(model.dtype(name))] += n
        files = sorted(p.name for p in path.glob("*.safetensors"))
        tied = config.get("tie_word_embeddings")
        if tied is None:  # not in config.json: the files tell, a tied head is stored once
            tied = not any(n.endswith("lm_head.weight") for n in names)
        text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        hidden = next((config.get(k) or text_config.get(k) for k in HIDDEN_SIZE_KEYS
                       if config.get(k) or text_config.get(k)), None)
        info = {
            "name": path.absolute().name,
            "path": str(path.absolute()),
            "format": "safetensors",
            "architecture": model.architecture,
            "model_type": config.get("model_type"),
            "parameters": model.num_parameters,
            "dtype": by_dtype.most_common(1)[0][0] if by_dtype else None,
            "dtypes": sorted(by_dtype),
            "layers": model.num_layers,
            "hidden_size": hidden,
            "vocab_size": config.get("vocab_size") or text_config.get("vocab_size"),
            "tensors": len(names),
            "files": files,
            "bytes": _bytes_on_disk(path),
            "tied_embeddings": bool(tied),
        }
        if meta is not None:
            info.update(quant_info(meta, {n: (model.shape(n), model.dtype(n)) for n in names}))
        return info


def stored_size(layers: dict[str, dict], tensors: dict[str, tuple[tuple[int, ...], object]]) -> dict:
    """Bits per weight of the quantized linear layers from the stored tensors' shapes and dtypes (a
    safetensors header): the keys and values of `workbench.quant.model.size_report`.

    `layers`: quant_config.json's ``layers``; `tensors`: name -> (shape, torch dtype)."""
    base = adapters = other = 0
    for name, (shape, dtype) in tensors.items():
        module, _, leaf = name.rpartition(".")
        nbytes = _numel(shape) * dtype.itemsize
        if module in layers and leaf in BASE_LEAVES:
            base += nbytes
        elif module in layers and leaf in ADAPTER_LEAVES:
            adapters += nbytes
        else:
            other += nbytes
    weights = sum(e["in_features"] * e["out_features"] for e in layers.values())
    return {"quantized_layers": len(layers), "quantized_weights": weights,
            "bits_per_weight": 8 * base / max(weights, 1),
            "bits_per_weight_with_adapters": 8 * (base + adapters) / max(weights, 1),
            "adapter_params": sum(e["lora_rank"] * (e["in_features"] + e["out_features"]) for e in layers.values()),
            "linear_bytes": base, "adapter_bytes": adapters, "other_bytes": other,
            "total_bytes": base + adapters + other}


def _weight_params(layers: dict[str, dict], tensors: dict[str, tuple[tuple[int, ...], object]]) -> int:
    """Parameters of the model the directory stands for: in x out per quantized layer, the stored size
    of every other tensor; adapters not counted (see ``adapter_params``)."""
    total = sum(e["in_features"] * e["out_features"] for e in layers.values())
    for name, (shape, _) in tensors.items():
        module, _, leaf = name.rpartition(".")
        if module not in layers or leaf not in BASE_LEAVES + ADAPTER_LEAVES:
            total += _numel(shape)
    return total


def layer_formats(layers: dict[str, dict]) -> dict[str, int]:
    """Format (``ternary g64``, ``4-bit g64``) -> number of layers, most weights first."""
    from workbench.quant.kernels import layer_format

    count: Counter = Counter()
    weights: Counter = Counter()
    for e in layers.values():
        fmt = layer_format(e["kind"], e["bits"], e["group_size"])
        count[fmt] += 1
        weights[fmt] += e["in_features"] * e["out_features"]
    return {fmt: count[fmt] for fmt, _ in weights.most_common()}


def _recovery_summary(recovery) -> dict | None:
    if not isinstance(recovery, dict):
        return None
    keys = ("steps", "seconds", "calibration_tokens", "corpus", "ppl_before", "ppl_after")
    return {k: recovery[k] for k in keys if recovery.get(k) is not None}


def quant_info(meta: dict, tensors: dict[str, tuple[tuple[int, ...], object]]) -> dict:
    """The fields `model_info` adds (and overrides) for a compressed directory."""
    from workbench.quant.kernels import kernel_paths, unfused_layers

    layers = meta["layers"]
    size = stored_size(layers, tensors)
    formats = layer_formats(layers)
    unfused, paths = unfused_layers(layers), kernel_paths(layers)
    return {
        "format": QUANT_FORMAT,
        "parameters": _weight_params(layers, tensors),
        "dtype": f"{' + '.join(formats)} ({size['bits_per_weight']:.2f} bpw)",
        "quantized": True,
        "layer_formats": formats,
        **size,
        "lora_ranks": sorted({e["lora_rank"] for e in layers.values() if e["lora_rank"]}),
        "storage": "trits" if any(e.get("storage") == "trits" for e in layers.values()) else "packed",
        "embeddings": meta.get("embeddings", "float32"),
        "recovered": "recovery" in meta,
        "recovery": _recovery_summary(meta.get("recovery")),
        "source_model": meta.get("source_model"),
        "kernels": {fmt: paths[fmt] for fmt in formats},
        "unfused_layers": len(unfused),
        "unfused_formats": dict(Counter(unfused.values()).most_common()),
    }


def gguf_info(path: str | Path) -> dict:
    """Metadata of a GGUF file, read with ``gguf.GGUFReader`` (no tensor is dequantized)."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on corrupt files
        raise ModelInfoError(f"{path}: unreadable GGUF file ({type(e).__name__}: {e})") from None

    def field(key: str, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception:
            return default

    arch = field("general.architecture", "unknown")
    quant = Counter(t.tensor_type.name for t in reader.tensors)
    params_by_type: Counter = Counter()
    for t in reader.tensors:
        params_by_type[t.tensor_type.name] += int(t.n_elements)
    tensor_names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = field(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    file_type = field("general.file_type")
    if file_type is not None:
        try:
            from gguf import LlamaFileType

            file_type = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except (ImportError, ValueError):
            file_type = str(file_type)
    layers = field(f"{arch}.block_count")
    if layers is None:
        layers = len({n.split(".")[1] for n in tensor_names if n.startswith("blk.")})
    return {
        "name": path.name,
        "gguf_name": field("general.name"),
        "path": str(path.absolute()),
        "format": "gguf",
        "architecture": arch,
        "model_type": arch,
        "parameters": sum(params_by_type.values()),
        "dtype": file_type or (params_by_type.most_common(1)[0][0] if params_by_type else None),
        "dtypes": sorted(quant),
        "quantization": dict(sorted(quant.items())),
        "layers": int(layers),
        "hidden_size": field(f"{arch}.embedding_length"),
        "vocab_size": vocab,
        "context_length": field(f"{arch}.context_length"),
        "tensors": len(reader.tensors),
        "bytes": path.stat().st_size,
        "tied_embeddings": "output.weight" not in tensor_names,
        "gguf_version": field("GGUF.version"),
    }


def _looks_like_model_dir(path: Path) -> bool:
    if (path / "config.json").is_file():
        return True
    return any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir())


def list_models(root: str | Path | None = None) -> list[dict]:
    """One row per model directory or .gguf file directly under ``root`` (default: the models home).

    A model that cannot be read still gets a row, with its ``error``, so one broken directory
    does not hide the others.
    """
    if root is None:
        from workbench.home import models_dir

        root = models_dir()
    root = Path(root)
    if not root.is_dir():
        raise ModelInfoError(f"{root}: no such directory")
    rows = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name.lower()):
        if entry.name.startswith("."):  # temporary directories of unfinished writes, locks
            continue
        if entry.is_dir() and not _looks_like_model_dir(entry):
            continue
        if entry.is_file() and entry.suffix.lower() != ".gguf":
            continue
        try:
            rows.append(model_info(entry))
        except WorkbenchError as e:
            rows.append({"name": entry.name, "path": str(entry.absolute()), "error": str(e)})
    return rows


def _human(n: int, units: tuple[str, ...], base: float) -> str:
    value = float(n)
    for unit in units:
        if abs(value) < base or unit == units[-1]:
            return f"{value:.0f}{unit}" if unit == units[0] else f"{value:.1f}{unit}"
        value /= base
    return str(n)


COUNT_KEYS = ("parameters", "quantized_weights", "adapter_params")
BYTES_KEYS = ("bytes", "linear_bytes", "adapter_bytes", "other_bytes", "total_bytes")
LAYER_COUNT_DICTS = ("layer_formats", "unfused_formats")
UNFUSED = "unfused (dequantize + matmul)"


def format_value(key: str, value) -> str:
    if value is None:
        return "-"
    if key in COUNT_KEYS:
        return _human(value, ("", "K", "M", "B", "T"), 1000.0)
    if key in BYTES_KEYS:
        return _human(value, (" B", " KB", " MB", " GB", " TB"), 1000.0)
    if key.startswith("bits_per_weight"):
        return f"{value:.3f}"
    if key in LAYER_COUNT_DICTS:
        return ", ".join(f"{k}: {v} layer{'s' if v != 1 else ''}" for k, v in value.items()) or "none"
    if key == "kernels":
        return ", ".join(f"{k}: {v or UNFUSED}" for k, v in value.items())
    if key == "lora_ranks" and not value:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _detail_value(row: dict, key: str, value) -> str:
    """A field of `models info`'s one-model table: `format_value`, with exact counts beside rounded ones."""
    shown = format_value(key, value)
    if key in COUNT_KEYS + BYTES_KEYS and value is not None:
        return f"{shown} ({value:,})"
    if key == "unfused_layers" and "quantized_layers" in row:
        return f"{value} of {row['quantized_layers']}" + (" (all have a fused kernel)" if not value else "")
    return shown
