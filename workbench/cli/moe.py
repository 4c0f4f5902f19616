"""`workbench moe` over :mod:`workbench.ops.moe` (mergekit-moe's command)."""

from __future__ import annotations

import argparse

from rich.console import Console

from workbench.cli.progress import progress_bars

console = Console(stderr=True)


def cmd_moe(args: argparse.Namespace) -> int:
    from workbench.merge.executor import keep_freed_memory
    from workbench.ops.moe import moe

    keep_freed_memory()
    with progress_bars(console, not args.no_progress) as progress:
        result = moe(args.config, args.out, device=args.device, gate_dtype=args.gate_dtype, seed=args.seed,
                     shard_size=args.shard_size, overwrite=args.overwrite,
                     allow_all_same=args.i_understand_this_is_not_useful_without_training, progress=progress)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False, markup=True)
    console.print(f"[green]built[/green] {result.summary()}: {result.num_tensors} tensors into {result.out_dir} "
                  f"({result.num_shards} shard{'s' if result.num_shards > 1 else ''}, "
                  f"{result.bytes_written / 1e6:.1f} MB) in {result.seconds:.1f} s", highlight=False)
    print(result.out_dir)
    return 0


def add_parsers(sub) -> None:
    m = sub.add_parser("moe", help="build a mixture of experts from dense models (a mergekit-moe config)")
    m.add_argument("config", help="mergekit-moe config YAML (base_model, experts, gate_mode, ...)")
    m.add_argument("out", help="output model directory (written atomically)")
    m.add_argument("--device", default="cpu", help="where hidden-state gates are computed: cpu, cuda, cuda:N")
    m.add_argument("--gate-dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                   help="dtype the base model runs in for hidden gates (default bfloat16, as mergekit)")
    m.add_argument("--seed", type=int, default=0,
                   help="seed for random gates and expert noise (mergekit-moe's --random-seed; default 0)")
    m.add_argument("--shard-size", default="2GB", help="max bytes per output shard, e.g. 500MB, 2GB")
    m.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    m.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    m.add_argument("--i-understand-this-is-not-useful-without-training", action="store_true",
                   help="allow every expert to be the same model (an MoE to train further)")
    m.set_defaults(func=cmd_moe, skip_teardown=True)
