"""The `workbench` command line: an argparse + rich adapter over :mod:`workbench.ops` (nothing else
imports it). Every command works headless; long work shows rich progress."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}   # writes outside an atomic output end as one line too
_SKIP_TEARDOWN = False   # set by a command whose process may end without the interpreter's teardown


def cmd_eval(args: argparse.Namespace) -> int:
    from workbench.cli.eval import run_eval_cli

    return run_eval_cli(args)


def cmd_search(args: argparse.Namespace) -> int:
    from workbench.cli.search import run_search_cli

    return run_search_cli(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from workbench.demo import run_demo

    return run_demo()


def cmd_tui(args: argparse.Namespace) -> int:
    from workbench.tui import run_app

    return run_app()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench", description=__doc__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    from workbench.cli import lora, merge, models, moe, quant

    merge.add_parsers(sub)
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
    se.add_argument("--device", default="cpu", help="where candidates are merged and scored: cpu, cuda, cuda:N, "
                                                     "auto (default: cpu)")
    se.add_argument("--plan", action="store_true", help="print the memory the search needs per device and "
                                                        "whether it fits, then stop")
    se.add_argument("--backend", default="local", choices=["local", "processes", "ray"],
                    help="where candidates are evaluated (default: in this process)")
    se.add_argument("--workers", type=int, default=None,
                    help="worker processes or Ray actors (default: one per GPU with --device cuda/auto, else 2)")
    se.add_argument("--address", default="local", help="Ray cluster: 'auto', an address, or 'local' (start one)")
    se.add_argument("--report-top", type=int, default=3, help="candidates in the held-out report (default 3)")
    se.add_argument("--no-report", action="store_true", help="skip the held-out report at the end")
    se.add_argument("--no-progress", action="store_true", help="plain lines instead of a live display")
    se.set_defaults(func=cmd_search)

    models.add_parsers(sub)
    moe.add_parsers(sub)
    lora.add_parsers(sub)

    ev = sub.add_parser("eval", help="evaluate a model on task files (multiple choice, exact match, perplexity, kl) "
                        "or lm-evaluation-harness tasks (lm_eval:NAME)")
    ev.add_argument("model", type=Path, help="a model directory (float, or compressed by `workbench quantize` / "
                    "`recover`), a .gguf file, or a name in the home's models/")
    ev.add_argument("tasks", nargs="+", metavar="TASK",
                    help="a task header .yml, a built-in task name, or lm_eval:NAME (an lm-eval task)")
    ev.add_argument("--split", default="search",
                    help="split to evaluate (default: search; lm_eval tasks: search, heldout or all)")
    lm = ev.add_argument_group("lm-eval tasks (lm_eval:NAME; needs workbench[lm-eval])")
    lm.add_argument("--include-path", type=Path, action="append", default=[], metavar="DIR",
                    help="a directory of your own lm-eval task YAMLs (repeatable)")
    lm.add_argument("--lm-eval-seed", type=int, default=0, help="the shuffle that cuts search / heldout (default 0)")
    lm.add_argument("--search-docs", type=int, default=None,
                    help="documents in the search split (default: half, at most 200)")
    lm.add_argument("--heldout-docs", type=int, default=None,
                    help="documents in the heldout split (default: the rest, at most 1000)")
    lm.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: as the task defines)")
    lm.add_argument("--chat-template", action="store_true", help="render the requests through the chat template")
    ev.add_argument("--limit", type=int, default=None, help="first N items of the split")
    ev.add_argument("--json", type=Path, default=None, help="write {task: {metric, metric_stderr, ...}} here")
    ev.add_argument("--log-samples", type=Path, default=None, help="write one JSON line per scored request")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ev.add_argument("--device", default="auto", help="where the model runs: cpu, cuda, cuda:N, auto (default: auto, "
                                                     "CUDA when present)")
    ev.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ev.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default 32)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    ev.add_argument("--overwrite", action="store_true", help="replace existing --json / --log-samples files")
    ev.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="merge the default model with two variants and print where the result is")
    d.set_defaults(func=cmd_demo)

    quant.add_parsers(sub)
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

    global _SKIP_TEARDOWN
    try:
        rc = args.func(args) or 0
        _SKIP_TEARDOWN = rc == 0 and getattr(args, "skip_teardown", False)  # the output is complete: see entry()
        return rc
    except WorkbenchError as e:
        from rich.text import Text

        # one line however long (a log or a pipe keeps it whole), and the message is not markup
        console.print(Text.assemble(("error:", "bold red"), " ", str(e)), soft_wrap=True, highlight=False)
        return 2
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        from rich.text import Text

        where = f"{e.filename}: " if e.filename else ""
        console.print(Text.assemble(("error:", "bold red"), f" {where}out of disk space or over the file size limit "
                                    f"({e.strerror}); what was being written is incomplete"),
                      soft_wrap=True, highlight=False)
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
