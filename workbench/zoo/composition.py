"""Where a model's combined-task errors come from: the digits or the French after them.

    python -m workbench.zoo.composition [MODEL_DIR | RECIPE.yml ...] [--split heldout] [--json OUT]

Every ``zoo-arith-french`` item has one distractor with the right digits spelled wrong
("68, soixante-dix-huit.") and two with wrong digits. From the evaluator's per-choice
log-likelihoods this splits accuracy into

- ``digits_right``: the chosen answer has the right digits (gold or the misspelling);
- ``spelled_right_given_digits``: of those, the share that is gold (so acc = product of the two);
- ``spell_pairwise``: gold scores above the misspelling, whatever the digits (chance 50):
  the French skill in the combined answer's position, apart from the arithmetic.

Without arguments: the base, both experts and the plain linear / TIES merges of the zoo
report, each held in bfloat16 as the search scores candidates.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASK = "zoo-arith-french"


def decompose(items: list[dict], logliks: list[list[float]]) -> dict:
    """Percentages (see the module docstring) from items (``choices``, ``gold``) and their
    per-choice log-likelihoods, in the same order."""
    if len(items) != len(logliks) or not items:
        raise ValueError(f"expected one list of log-likelihoods per item, got {len(logliks)} for {len(items)} items")
    acc = digits = pairwise = 0
    for item, ll in zip(items, logliks):
        choices, gold = item["choices"], item["gold"]
        same = [j for j, c in enumerate(choices) if j != gold and c.split(",")[0] == choices[gold].split(",")[0]]
        if len(same) != 1:
            raise ValueError(f"item {item['context']!r}: expected exactly one distractor with the gold digits")
        chosen = max(range(len(choices)), key=lambda j: ll[j])
        acc += chosen == gold
        digits += chosen in (gold, same[0])
        pairwise += ll[gold] > ll[same[0]]
    n = len(items)
    return {"items": n, "acc": 100 * acc / n, "digits_right": 100 * digits / n,
            "spelled_right_given_digits": 100 * acc / digits if digits else 0.0,
            "spell_pairwise": 100 * pairwise / n}


def model_logliks(model, tokenizer, split: str = "heldout", limit: int | None = None,
                  task=TASK) -> tuple[list[dict], list[list[float]]]:
    """The task's items of ``split`` (file order) and the model's log-likelihood of each choice.
    ``task``: a :class:`~workbench.eval.taskfile.Task`, or a name or path to load."""
    from workbench.eval.evaluator import evaluate
    from workbench.eval.taskfile import Task, load_task

    task = task if isinstance(task, Task) else load_task(task)
    result = evaluate(model, tokenizer, [task], split=split, limit=limit, log_samples=True)[task.name]
    by_line: dict[int, dict[int, float]] = {}
    for s in result.samples:
        by_line.setdefault(s["line"], {})[s["choice"]] = s["loglikelihood"]
    data = {it.line: it.data for it in task.split_items(split)}
    items = [data[line] for line in sorted(by_line)]
    logliks = [[by_line[line][j] for j in sorted(by_line[line])] for line in sorted(by_line)]
    return items, logliks


def resolve_candidate(ref: str):
    """Check ``ref`` before anything is scored: a recipe (the zoo report's ``zoo-linear`` /
    ``zoo-ties``, or a ``.yml`` file) whose models all open, or a model directory or zoo name."""
    from workbench.models.loader import resolve_model
    from workbench.merge.plan import plan_merge
    from workbench.merge.recipe import load_recipe, parse_recipe
    from workbench.zoo.report import MERGES

    if ref in MERGES or ref.endswith((".yml", ".yaml")):
        recipe = parse_recipe(MERGES[ref], source=f"<{ref}>") if ref in MERGES else load_recipe(ref)
        plan_merge(recipe).close()   # a missing source is named here, with the recipe's field
        return recipe
    return resolve_model(ref)


def load_candidate(resolved):
    """What :func:`resolve_candidate` gave, as (model, tokenizer) in bfloat16 (recipes merged in memory)."""
    from workbench.models.loader import load_model
    from workbench.merge.recipe import Recipe
    from workbench.search.candidates import InMemoryMerger

    if isinstance(resolved, Recipe):
        merger = InMemoryMerger(resolved, model_dtype="bfloat16")
        merger.apply(resolved)
        return merger.model, merger.tokenizer
    return load_model(resolved, dtype="bfloat16")


def main(argv: list[str] | None = None) -> int:
    from workbench.atomic import atomic_file
    from workbench.errors import WorkbenchError
    from workbench.eval.taskfile import load_task
    from workbench.home import DEFAULT_MODEL_NAME

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help="model directories, zoo model names or recipe files")
    p.add_argument("--split", default="heldout")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    refs = args.models or [DEFAULT_MODEL_NAME, "zoo-expert-arith", "zoo-expert-french", "zoo-linear", "zoo-ties"]
    try:   # every input is checked before the first model is scored
        if args.limit is not None and args.limit < 1:
            raise WorkbenchError(f"--limit: expected a positive number of items, got {args.limit}")
        task = load_task(TASK)
        task.split_items(args.split)
        resolved = [resolve_candidate(ref) for ref in refs]
        rows = {}
        print(f"| model ({args.split}) | acc | digits right | spelled right given digits | spell pairwise |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for ref, candidate in zip(refs, resolved):
            model, tokenizer = load_candidate(candidate)
            rows[ref] = r = decompose(*model_logliks(model, tokenizer, args.split, args.limit, task))
            print(f"| {ref} | {r['acc']:.1f} | {r['digits_right']:.1f} | {r['spelled_right_given_digits']:.1f} "
                  f"| {r['spell_pairwise']:.1f} |", flush=True)
            del model
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with atomic_file(args.json) as f:
            f.write(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
