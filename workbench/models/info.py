"""What a model is: architecture, parameters, dtypes, layers, size. For safetensors model
directories (read through ``ModelDir``, headers only) and for GGUF files (metadata only, nothing
dequantized), and a listing of the models in the workbench home."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from workbench.errors import WorkbenchError

HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model")
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


def _dir_info(path: Path) -> dict:
    from workbench.models.checkpoint import ModelDir

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
        return {
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


def format_value(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "parameters":
        return _human(value, ("", "K", "M", "B", "T"), 1000.0)
    if key == "bytes":
        return _human(value, (" B", " KB", " MB", " GB", " TB"), 1000.0)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def print_models(rows: list[dict], json_out: bool = False) -> None:
    """Print model rows to stdout: a rich table, or a JSON list (one object per model)."""
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a pipe or a log: no wrapping at 80 columns
        console = Console(width=1000)
    if not rows:
        console.print("no models found", highlight=False, soft_wrap=True)
        return
    if len(rows) == 1 and "error" not in rows[0]:  # `models info`: one field per line
        row = rows[0]
        table = Table(title=row.get("name"), show_header=False, title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for key, value in row.items():
            shown = format_value(key, value)
            if key in ("parameters", "bytes") and value is not None:
                shown = f"{shown} ({value:,})"
            table.add_row(key, shown)
        console.print(table)
        return
    columns = TABLE_COLUMNS if console.width >= 150 else TABLE_COLUMNS[:-1]  # the path, on wide screens
    table = Table(show_lines=False)
    for key, header in columns:
        justify = "right" if key in ("parameters", "layers", "hidden_size", "vocab_size", "bytes") else "left"
        table.add_column(header, justify=justify, overflow="fold", no_wrap=key == "name")
    errors = [row for row in rows if "error" in row]
    for row in rows:
        if "error" not in row:
            table.add_row(*(format_value(key, row.get(key)) for key, _ in columns))
    if table.row_count:
        console.print(table)
    for row in errors:
        console.print(f"[red]unreadable[/red] {row.get('name', '?')}: {row['error']}",
                      highlight=False, soft_wrap=True)
