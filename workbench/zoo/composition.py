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
                  task: str | Path = TASK) -> tuple[list[dict], list[list[float]]]:
    """The task's items of ``split`` (file order) and the model's log-likelihood of each choice."""
    from workbench.eval.evaluator import evaluate
    from workbench.eval.taskfile import load_task

    task = load_task(task)
    result = evaluate(model, tokenizer, [task], split=split, limit=limit, log_samples=True)[task.name]
    by_line: dict[int, dict[int, float]] = {}
    for s in result.samples:
        by_line.setdefault(s["line"], {})[s["choice"]] = s["loglikelihood"]
    data = {it.line: it.data for it in task.split_items(split)}
    items = [data[line] for line in sorted(by_line)]
    logliks = [[by_line[line][j] for j in sorted(by_line[line])] for line in sorted(by_line)]
    return items, logliks


def load_candidate(ref: str):
    """A model directory (or zoo model name) or a merge recipe (merged in memory), in bfloat16."""
    from workbench.eval.cli import load_model
    from workbench.merge.recipe import load_recipe, parse_recipe
    from workbench.search.candidates import InMemoryMerger
    from workbench.zoo.report import MERGES

    if ref in MERGES or ref.endswith((".yml", ".yaml")):
        recipe = parse_recipe(MERGES[ref], source=f"<{ref}>") if ref in MERGES else load_recipe(ref)
        merger = InMemoryMerger(recipe, model_dtype="bfloat16")
        merger.apply(recipe)
        return merger.model, merger.tokenizer
    return load_model(ref, dtype="bfloat16")


def main(argv: list[str] | None = None) -> int:
    from workbench.home import DEFAULT_MODEL_NAME

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", help="model directories, zoo model names or recipe files")
    p.add_argument("--split", default="heldout")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    refs = args.models or [DEFAULT_MODEL_NAME, "zoo-expert-arith", "zoo-expert-french", "zoo-linear", "zoo-ties"]
    rows = {}
    print(f"| model ({args.split}) | acc | digits right | spelled right given digits | spell pairwise |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for ref in refs:
        model, tokenizer = load_candidate(ref)
        rows[ref] = decompose(*model_logliks(model, tokenizer, args.split, args.limit))
        r = rows[ref]
        print(f"| {ref} | {r['acc']:.1f} | {r['digits_right']:.1f} | {r['spelled_right_given_digits']:.1f} "
              f"| {r['spell_pairwise']:.1f} |", flush=True)
        del model
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
