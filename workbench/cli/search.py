"""`workbench search` over :mod:`workbench.ops.search`: a merge search headless, with a live rich display
(a quantization search: :mod:`workbench.cli.qsearch`); ``--plan`` prints the memory plan and stops
(exit 1 when it does not fit)."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn



def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def run_search_cli(args) -> int:
    from workbench.cli.qsearch import recover_points_cli, run_quant_search_cli, show_front_cli
    from workbench.ops.search import open_search, run_kind
    from workbench.search.report import heldout_report, report_markdown

    if args.front:
        return show_front_cli(args)
    if args.recover:
        return recover_points_cli(args)
    if args.plan:
        from workbench.ops.search import search_memory_plan

        plan = search_memory_plan(args.spec, args.resume, device=args.device, backend=args.backend,
                                  workers=args.workers)
        print(plan.table())
        return 0 if plan.fits() else 1
    if run_kind(args.spec, args.resume) == "quantization":
        return run_quant_search_cli(args)
    console = Console(stderr=True)
    run_dir = Path(args.resume or args.out or "")
    with console.status("loading the sources and tasks..."):
        search = open_search(args.spec, args.out, args.resume, device=args.device, backend=args.backend,
                             workers=args.workers, address=args.address)
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
        with console.status("held-out report...") as status:
            def on_grid(done: int, total: int, row: dict) -> None:
                status.update(f"held-out report: grid baseline {done}/{total} (search split)")

            report = heldout_report(search, top=args.report_top, on_grid=on_grid)
        console.print(report_markdown(report))
    search.close()
    print(run_dir)
    return 0
