"""`workbench search` and `workbench recipe export`: the search headless, with a live rich display."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from workbench.errors import WorkbenchError


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def run_search_cli(args) -> int:
    from workbench.search.report import heldout_report, report_markdown
    from workbench.search.run import open_search

    from workbench.quant.search.cli import is_quant_run, recover_points_cli, run_quant_search_cli, show_front_cli

    if getattr(args, "front", None):
        return show_front_cli(args)
    if getattr(args, "recover", None):
        return recover_points_cli(args)
    if is_quant_run(args):
        return run_quant_search_cli(args)
    console = Console(stderr=True)
    if args.resume:
        run_dir = Path(args.resume)
    else:
        if args.spec is None or args.out is None:
            raise WorkbenchError("workbench search: give SPEC.yml --out RUN_DIR, or --resume RUN_DIR")
        run_dir = Path(args.out)
    with console.status("loading the sources and tasks..."):
        search = open_search(args.spec, run_dir, resume=bool(args.resume), device=args.device,
                             backend=args.backend, workers=args.workers, address=args.address)
    spec, state = search.spec, search.state
    console.print(f"[bold]{spec.name}[/bold]: {spec.merge_method}, {search.layout.describe()}, seed {spec.seed}"
                  + (f", resuming after generation {state.generation}" if args.resume else ""))
    total = spec.budget.generations
    with Progress(TextColumn("[bold]generation"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=console, disable=args.no_progress) as progress:
        bar = progress.add_task("", total=total, completed=state.generation, info="")
        done_in_gen = [0]

        def on_candidate(ev) -> None:
            done_in_gen[0] += 1
            progress.update(bar, info=f"candidate {done_in_gen[0]}/{spec.budget.population + 1} "
                                      f"score {_fmt(ev.score)} (merge {ev.merge_seconds:.1f}s, {ev.seconds:.1f}s)")

        def on_generation(ev) -> None:
            done_in_gen[0] = 0
            rate = ev.evaluations / (ev.elapsed / 60) if ev.elapsed else 0
            eta = f", ETA {ev.eta / 60:.1f} min" if ev.eta is not None else ""
            line = (f"gen {ev.generation}: best {_fmt(ev.best)} mean {_fmt(ev.mean)} incumbent {_fmt(ev.incumbent)}"
                    f" | {ev.evaluations} evals, {rate:.1f}/min{eta}")
            progress.update(bar, completed=ev.generation + 1, info="")
            if args.no_progress:
                console.print(line)
            else:
                progress.console.print(line)

        try:
            final = search.run(on_candidate=on_candidate, on_generation=on_generation)
        except BaseException:
            search.close()
            raise
    console.print(f"stopped: {final.stop_reason}; best search score {_fmt(final.incumbent and final.incumbent['score'])}"
                  f"; recipe: {run_dir / 'best.yml'}")
    if not args.no_report and final.incumbent is not None:
        with console.status("held-out report..."):
            report = heldout_report(search, top=args.report_top)
        console.print(report_markdown(report))
    search.close()
    print(run_dir)
    return 0


def export_recipe_cli(args) -> int:
    """Write the incumbent recipe of a run to OUT.yml, every model by its absolute path (so that
    `mergekit-yaml` reads it too); an existing OUT.yml is refused unless --overwrite."""
    from workbench.atomic import check_output
    from workbench.merge.recipe import dump_recipe, recipe_from_dict, save_recipe

    run_dir, overwrite = Path(args.run), getattr(args, "overwrite", False)
    check_output(args.out, overwrite, file=True)
    best = best_history_row(run_dir)
    recipe = recipe_from_dict(best["recipe"], source=str(run_dir / "best.yml")).resolved()
    summary = f"generation {best['generation']} candidate {best['index']} (search score {best['score']:.4f})"
    save_recipe(recipe, args.out, overwrite=overwrite, header=f"# best recipe of search run {run_dir}: {summary}\n")
    Console(stderr=True).print(f"recipe of {summary} -> {args.out}")
    if args.print:
        print(dump_recipe(recipe))
    return 0


def best_history_row(run_dir: Path) -> dict:
    """The best-scored row of a run's history.jsonl, read as the UI reads it (`read_history`: a
    row cut short by a kill, and anything after it, is left out)."""
    from workbench.search.run import read_history

    if not (run_dir / "history.jsonl").is_file():
        raise WorkbenchError(f"{run_dir}: not a search run directory (no history.jsonl)")
    rows = read_history(run_dir)
    scored = [r for r in rows if r.get("score") is not None]
    if not scored:
        raise WorkbenchError(f"{run_dir}: no candidate has been scored yet")
    return max(scored, key=lambda r: r["score"])
