"""The zoo's score table: base, both experts, a 50/50 linear merge and a TIES merge, on the
held-out split of every zoo task.

    python -m workbench.zoo.report [--split heldout] [--json OUT.json]

The merges are made once into ``$WORKBENCH_HOME/merges/`` from the recipes below (the same
as ``recipes/zoo-linear.yml`` and ``recipes/zoo-ties.yml``). Scores come from the project's
evaluator (``workbench.eval.evaluate``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from workbench.home import DEFAULT_MODEL_NAME, models_dir, workbench_home

LINEAR_RECIPE = """\
merge_method: linear
models:
  - model: zoo-expert-arith
    parameters: {weight: 0.5}
  - model: zoo-expert-french
    parameters: {weight: 0.5}
parameters:
  normalize: true
dtype: float32
"""
TIES_RECIPE = f"""\
merge_method: ties
base_model: {DEFAULT_MODEL_NAME}
models:
  - model: zoo-expert-arith
    parameters: {{weight: 0.5, density: 0.5}}
  - model: zoo-expert-french
    parameters: {{weight: 0.5, density: 0.5}}
parameters:
  normalize: true
dtype: float32
"""
MERGES = {"zoo-linear": LINEAR_RECIPE, "zoo-ties": TIES_RECIPE}
TASKS = ["zoo-arith", "zoo-french", "zoo-arith-french", "zoo-perplexity", "zoo-kl"]
# (metric, header) per task type for the table
COLUMNS = {"multiple_choice": ("acc", "acc"), "perplexity": ("ppl", "ppl"), "kl": ("kl", "KL")}


def ensure_merges() -> dict[str, Path]:
    from workbench.merge.executor import execute_merge
    from workbench.merge.plan import plan_merge
    from workbench.merge.recipe import parse_recipe

    out = {}
    for name, text in MERGES.items():
        path = workbench_home() / "merges" / name
        if not (path / "model.safetensors").is_file():
            plan = plan_merge(parse_recipe(text, source=f"<{name}>"))
            try:
                execute_merge(plan, path, overwrite=True)
            finally:
                plan.close()
        out[name] = path
    return out


def score_table(split: str = "heldout", threads: int | None = None, log=print) -> dict:
    from workbench.models.loader import load_model
    from workbench.eval.evaluator import evaluate

    models = {DEFAULT_MODEL_NAME: models_dir() / DEFAULT_MODEL_NAME,
              "zoo-expert-arith": models_dir() / "zoo-expert-arith",
              "zoo-expert-french": models_dir() / "zoo-expert-french"}
    models.update(ensure_merges())
    table: dict = {}
    for name, path in models.items():
        t0 = time.time()
        model, tok = load_model(path)
        res = evaluate(model, tok, TASKS, split=split, threads=threads)
        table[name] = {t: r.to_dict() for t, r in res.items()}
        log(f"{name}: " + ", ".join(f"{t} {_cell(r.type, r.to_dict())}" for t, r in res.items())
            + f" ({time.time() - t0:.0f} s)")
        del model
    return table


def _cell(ttype: str, d: dict) -> str:
    metric = COLUMNS[ttype][0]
    v, se = d.get(metric), d.get(f"{metric}_stderr")
    if v is None:
        return "-"
    if metric == "acc":
        return f"{100 * v:.1f} ± {100 * se:.1f}" if se is not None else f"{100 * v:.1f}"
    return f"{v:.3f}" if metric == "kl" else f"{v:.2f}"


def markdown(table: dict, split: str = "heldout") -> str:
    first = next(iter(table.values()))
    heads = []
    for t in TASKS:
        ttype = first[t]["type"]
        unit = " (acc %)" if ttype == "multiple_choice" else " (ppl)" if ttype == "perplexity" else " (KL)"
        heads.append(f"{t}{unit}")
    lines = [f"| model ({split}) | " + " | ".join(heads) + " |", "| --- |" + " ---: |" * len(TASKS)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row[t]["type"], row[t]) for t in TASKS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="heldout")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    table = score_table(args.split, args.threads, log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    print(markdown(table, args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
