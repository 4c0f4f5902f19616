"""`workbench merge`, `workbench recipe validate` and `workbench recipe export` over :mod:`workbench.ops.merge`."""

from __future__ import annotations

import argparse

from rich.console import Console

from workbench.cli.progress import progress_bars

console = Console(stderr=True)


def cmd_merge(args: argparse.Namespace) -> int:
    from workbench.merge.executor import keep_freed_memory
    from workbench.ops.merge import merge

    keep_freed_memory()   # a one-shot process; a long-lived one (the UI) should give memory back
    with progress_bars(console, not args.no_progress) as progress:
        result = merge(args.recipe, args.out, device=args.device, dtype=args.dtype, shard_size=args.shard_size,
                       seed=args.seed, overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite,
                       as_lora=args.as_lora, rank=args.rank, progress=progress)
    if args.as_lora is not None:
        from workbench.cli.lora import print_extraction

        console.print(f"[green]merged[/green] {result.merge.num_tensors} tensors in {result.merge.seconds:.1f} s; "
                      f"as a LoRA adapter over {args.as_lora}:")
        print_extraction(console, result.lora)
        print(result.out)
        return 0
    console.print(f"[green]merged[/green] {result.num_tensors} tensors into {result.out_dir} "
                  f"({result.num_shards} shard{'s' if result.num_shards > 1 else ''}, "
                  f"{result.bytes_written / 1e6:.1f} MB) in {result.seconds:.1f} s, "
                  f"peak memory {result.peak_rss_bytes / 1e6:.0f} MB")
    print(result.out_dir)
    return 0


def cmd_recipe_validate(args: argparse.Namespace) -> int:
    from workbench.ops.merge import validate

    result = validate(args.recipe, args.mergekit_paths, overwrite=args.overwrite)
    console.print(f"[green]ok[/green] {args.recipe}: {result.summary()}")
    if result.mergekit_paths:
        console.print(f"wrote {result.mergekit_paths} (every model by its absolute path, for mergekit-yaml)")
    return 0


def cmd_recipe_export(args: argparse.Namespace) -> int:
    from workbench.ops.merge import export_recipe

    result = export_recipe(args.run, args.out, overwrite=args.overwrite)
    console.print(f"recipe of {result.summary} -> {result.out}")
    if args.print:
        print(result.recipe_yaml)
    return 0


def add_parsers(sub) -> None:
    m = sub.add_parser("merge", help="merge models from a (mergekit-compatible) recipe YAML")
    m.add_argument("recipe", help="recipe YAML, or a search run directory (its best recipe)")
    m.add_argument("out", help="output model directory (written atomically)")
    m.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    m.add_argument("--dtype", default=None, help="output dtype (overrides the recipe's out_dtype)")
    m.add_argument("--shard-size", default="2GB", help="max bytes per output shard, e.g. 500MB, 2GB")
    m.add_argument("--seed", type=int, default=0, help="seed for DARE/DELLA random masks (default 0)")
    m.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    m.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    m.add_argument("--allow-nonfinite", action="store_true", help="merge even if a weight is NaN or inf")
    m.add_argument("--as-lora", metavar="BASE", default=None,
                   help="write the merge as a peft LoRA adapter over BASE at OUT (needs --rank)")
    m.add_argument("--rank", type=int, default=None, help="with --as-lora: the adapter's rank")
    m.set_defaults(func=cmd_merge, skip_teardown=True)

    r = sub.add_parser("recipe", help="recipe tools").add_subparsers(dest="recipe_command", metavar="ACTION")
    rv = r.add_parser("validate", help="validate a recipe against its models without merging")
    rv.add_argument("recipe")
    rv.add_argument("--mergekit-paths", metavar="OUT.yml",
                    help="also write the recipe with every model by its absolute path, for mergekit-yaml")
    rv.add_argument("--overwrite", action="store_true", help="replace OUT.yml if it exists")
    rv.set_defaults(func=cmd_recipe_validate)
    rx = r.add_parser("export", help="write the best recipe of a search run (models by absolute path, for mergekit)")
    rx.add_argument("run", help="search run directory")
    rx.add_argument("out", help="recipe YAML to write")
    rx.add_argument("--print", action="store_true", help="also print the recipe")
    rx.add_argument("--overwrite", action="store_true", help="replace OUT.yml if it exists")
    rx.set_defaults(func=cmd_recipe_export)
