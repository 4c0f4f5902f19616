"""`workbench extract-lora` over :func:`workbench.ops.lora.extract_lora`, and the table of
per-layer errors it (and `workbench merge --as-lora`) prints."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from workbench.cli.progress import progress_bars

console = Console(stderr=True)


def print_extraction(con: Console, result) -> None:
    """Per decomposed layer: shape, rank, relative error ||delta - BA||_F / ||delta||_F; then overall."""
    table = Table(title=f"LoRA extraction: rank {result.rank}", show_footer=True)
    table.add_column("layer", footer="overall")
    table.add_column("shape")
    table.add_column("rank", justify="right")
    table.add_column("rel. error", justify="right", footer=f"{result.rel_error:.3e}")
    for layer in result.layers:
        table.add_row(layer.name, "x".join(map(str, layer.shape)), str(layer.rank), f"{layer.rel_error:.3e}")
    con.print(table)
    if result.modules_to_save:
        con.print(f"saved at full rank (modules_to_save): {len(result.modules_to_save)} modules "
                  f"({', '.join(result.modules_to_save[:4])}{', ...' if len(result.modules_to_save) > 4 else ''})")
    if result.skipped:
        con.print(f"left out (undecomposable): {len(result.skipped)} modules")
    if result.dropped_biases:
        con.print(f"[yellow]note[/yellow]: {len(result.dropped_biases)} bias deltas left out (peft's lora_bias needs "
                  f"a bias in every adapted layer): {', '.join(result.dropped_biases[:4])}"
                  f"{', ...' if len(result.dropped_biases) > 4 else ''}")
    con.print(f"[green]wrote[/green] {result.out} in {result.seconds:.1f} s")


def cmd_extract_lora(args: argparse.Namespace) -> int:
    from workbench.ops.lora import extract_lora

    with progress_bars(console, not args.no_progress) as progress:
        result = extract_lora(args.base, args.finetuned, args.rank, args.out, device=args.device,
                              skip_undecomposable=args.skip_undecomposable, overwrite=args.overwrite,
                              progress=progress)
    print_extraction(console, result)
    print(result.out)
    return 0


def add_parsers(sub) -> None:
    x = sub.add_parser("extract-lora", help="extract FINETUNED - BASE as a peft LoRA adapter (truncated SVD "
                                            "per linear layer, as mergekit-extract-lora)")
    x.add_argument("base", help="base model (a path, a name in the home's models/, or BASE+ADAPTER)")
    x.add_argument("finetuned", help="finetuned model (same forms)")
    x.add_argument("--rank", type=int, required=True, help="LoRA rank (a smaller layer gets its full rank)")
    x.add_argument("--out", required=True, help="adapter directory to write (atomically)")
    x.add_argument("--device", default="cpu", help="where the SVDs run: cpu, cuda, cuda:N (default: cpu)")
    x.add_argument("--skip-undecomposable", action="store_true",
                   help="leave out modules that are neither linear nor embeddings (norms) instead of saving "
                        "them at full rank")
    x.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    x.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    x.set_defaults(func=cmd_extract_lora)
