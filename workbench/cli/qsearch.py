"""`workbench search` for a quantization spec, and `workbench search --front RUN`: rich adapters
over `workbench.ops.search` and `workbench.ops.qsearch`."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from workbench.errors import WorkbenchError


def run_quant_search_cli(args) -> int:
    from workbench.ops.qsearch import open_quant_run

    if args.resume is None and args.out is None:
        raise WorkbenchError("workbench search: give SPEC.yml --out RUN_DIR, or --resume RUN_DIR")
    if args.backend != "local":
        raise WorkbenchError(f"workbench search: a quantization search runs in this process; --backend "
                             f"{args.backend} serves merge searches only")
    from workbench.devices import resolve_device

    device = resolve_device(args.device)   # before the progress display: a bad --device is one line
    console = Console(stderr=True)
    run_dir = Path(args.resume or args.out or "")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=args.no_progress) as progress:
        bar = progress.add_task("layer database", total=None)

        def on_build(ev) -> None:
            progress.update(bar, description=f"layer database: {ev.text}"[:70], completed=ev.done, total=ev.total)

        search = open_quant_run(args.spec, run_dir, args.resume is not None, device=device, progress=on_build)
        db = search.db_report
        console.print(f"layer database {db['dir']}: {db['files']} files, {db['bytes'] / 1e6:.1f} MB, "
                      f"built {db['built']} in {db['seconds']:.1f} s; {db['levels_per_unit']:.1f} of "
                      f"{len(search.db.options)} options are levels (not beaten by a cheaper one on weight error), "
                      f"{db['levels_seconds']:.1f} s")
        spec, state = search.spec, search.state
        console.print(f"[bold]{spec.name}[/bold]: {len(search.units)} units x {len(search.db.options)} options, "
                      f"targets {', '.join(f'{t:g}' for t in spec.targets)} bpw, {spec.optimizer}, seed {spec.seed}"
                      + (f", resuming after generation {state['generation'] - 1}" if args.resume else ""))
        progress.update(bar, description="generation", completed=state["generation"], total=spec.generations + 1)

        def on_generation(ev) -> None:
            parents = "; ".join(f"{p['target']:g}: KL {p['fitness']:.4f} at {p['bpw']:.3f}" for p in ev.targets)
            line = (f"gen {ev.generation}: {parents} | {ev.evaluations} scored, {ev.rate:.0f} first-stage/min")
            progress.update(bar, completed=ev.generation + 1)
            (console if args.no_progress else progress.console).print(line)

        final = search.run(on_generation=on_generation)
        if args.no_report:
            search.write_target_configs()
            console.print(f"stopped: {final['stop_reason']}; no front (--no-report): `workbench search --resume "
                          f"{run_dir}` after raising the budget, or rerun without --no-report")
            print(run_dir)
            return 0
        hbar = progress.add_task("held-out scoring", total=None)
        front = search.front(lambda _, done, total: progress.update(hbar, completed=done, total=total))
    console.print(f"stopped: {final['stop_reason']} after {final['generation']} generations, "
                  f"{final['evaluations']} scored, {final['elapsed'] / 60:.1f} min")
    wide_console(stderr=True).print(front_table(front))
    print(run_dir)
    return 0


def show_front_cli(args) -> int:
    from workbench.ops.search import front as read_front

    front, recovered = read_front(args.front)
    console = wide_console()
    console.print(front_table(front))
    if recovered:
        console.print(recovered_table(recovered))
    return 0


def recover_points_cli(args) -> int:
    from workbench.devices import resolve_device
    from workbench.ops.qsearch import point_names, read_recovered, recover_points

    device = resolve_device(args.device)
    run_dir = Path(args.recover)
    if not (run_dir / "spec.yml").is_file():
        raise WorkbenchError(f"{run_dir}: not a search run directory (no spec.yml)")
    names = [n.strip() for n in args.points.split(",") if n.strip()]
    todo = point_names(run_dir, names)
    console = Console(stderr=True)
    console.print(f"recovering {len(todo)} config(s) of {run_dir}, {args.time_budget:g} min each: {', '.join(todo)}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=args.no_progress) as progress:
        bar = progress.add_task("", total=None)

        def on_progress(ev) -> None:
            progress.update(bar, description=ev.stage, completed=ev.done, total=ev.total)

        recover_points(run_dir, names, args.time_budget, overwrite=args.overwrite, progress=on_progress,
                       device=device)
    wide_console().print(recovered_table(read_recovered(run_dir)))
    return 0


def recovered_table(recovered: dict) -> Table:
    """Each recovered config before and after its recovery, held-out."""
    table = Table(title="after recovery: held-out KL and perplexity of each config, before -> after")
    for col in ("config", "bpw", "base", "minutes", "steps", "held-out KL", "held-out ppl"):
        table.add_column(col, justify="left" if col == "config" else "right", no_wrap=True)
    for name, e in sorted(recovered.items(), key=lambda kv: kv[1]["bpw"]):
        table.add_row(name, f"{e['bpw']:.3f}", f"{e['base_bpw']:.3f}", f"{e['minutes']:g}", str(e["steps"]),
                      f"{e['kl_before']:.4f} -> {e['kl_after']:.4f}", f"{e['ppl_before']:.2f} -> {e['ppl_after']:.2f}")
    return table


def front_table(front: dict) -> Table:
    """The front and, per target, the searched config against the best uniform one."""
    table = Table(title="quality vs size: bits per weight of the linear layers from stored bytes, adapters in")
    for col in ("point", "bpw", "base", "adapters", "search KL", "held-out KL", "held-out ppl", "layers"):
        table.add_column(col, justify="left" if col in ("point", "layers") else "right", no_wrap=col != "layers")

    def row(name: str, p: dict, note: str) -> None:
        table.add_row(name, f"{p['bpw']:.3f}", f"{p['base_bpw']:.3f}", f"{p['adapter_bpw']:.3f}",
                      f"{p['fitness']:.4f}", f"{p['heldout_kl']:.4f}", f"{p['heldout_ppl']:.2f}", note)

    for k, p in enumerate(front["front"]):
        row(p.get("yml", str(k)), p, ", ".join(f"{n} {lab}" for lab, n in p["mix"].items()))
    for t in front["targets"]:
        table.add_section()
        row(f"target {t['target']:g}", t["searched"], "searched")
        if t["best_uniform"]:
            row("  uniform", t["best_uniform"], f"best uniform: {t['best_uniform']['label']}; "
                                                f"ppl ratio {t['ppl_ratio']:.3f}")
    return table


def wide_console(stderr: bool = False) -> Console:
    """A console at least 140 columns wide, so a piped front stays one line per point."""
    return Console(stderr=stderr, width=max(140, Console().width))
