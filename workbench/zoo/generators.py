"""Seeded procedural generators for the default zoo's skills.

Three skills, each a small, exactly checkable one:

- ``arith``: two-digit addition and subtraction, answered with the number in digits
  ("What is 23 + 45?" -> "68.").
- ``french``: a number written out in French words ("Write the number 47. Answer in French
  words." -> "quarante-sept."; also "What is 47? ..." and "How do you write 47? ...").
- ``arith_french``: the combination, which needs both ("What is 23 + 45? Answer in digits,
  then in French words." -> "68, soixante-huit."). The digits come first, as a worked step:
  a 135M model cannot compose the two skills silently (with the bare French answer every merge
  of the experts stayed at chance), but it can compute and then spell what it wrote, as Sakana's
  Japanese math model reasons in Japanese before answering.

Every answer ends with a period, so that no answer is a prefix of another ("quarante." and
"quarante-deux.") when choices are scored by log-likelihood.

Nothing is hand-written: every answer is computed (``french_words`` spells numbers by the
rules of French number names, traditional spelling). Problems are drawn from universes that
are partitioned once, by a seeded shuffle, into ``train``, ``search`` and ``heldout`` parts,
so training data, search items and held-out items never share an operand pair (arithmetic)
or a number (French).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SPLITS = ("train", "search", "heldout")
FRENCH_SUFFIX = "Answer in French words."
COMBINED_SUFFIX = "Answer in digits, then in French words."

_UNITS = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix",
          "onze", "douze", "treize", "quatorze", "quinze", "seize"]
_TENS = {2: "vingt", 3: "trente", 4: "quarante", 5: "cinquante", 6: "soixante"}


def _below_100(n: int) -> str:
    if n <= 16:
        return _UNITS[n]
    if n < 20:
        return "dix-" + _UNITS[n - 10]
    tens, unit = divmod(n, 10)
    if tens in (7, 9):  # soixante-dix..., quatre-vingt-dix...: the "teen" rides on the tens below
        head = "soixante" if tens == 7 else "quatre-vingt"
        rest = n - (60 if tens == 7 else 80)
        if tens == 7 and unit == 1:
            return "soixante et onze"
        return f"{head}-{_below_100(rest)}"
    if tens == 8:
        return "quatre-vingts" if unit == 0 else f"quatre-vingt-{_UNITS[unit]}"
    if unit == 0:
        return _TENS[tens]
    if unit == 1:
        return f"{_TENS[tens]} et un"
    return f"{_TENS[tens]}-{_UNITS[unit]}"


def french_words(n: int) -> str:
    """``n`` (0 <= n <= 999) in French words, traditional spelling (pre-1990 hyphenation)."""
    if not isinstance(n, int) or not 0 <= n <= 999:
        raise ValueError(f"french_words: expected an integer in [0, 999], got {n!r}")
    hundreds, rest = divmod(n, 100)
    if hundreds == 0:
        return _below_100(rest)
    if hundreds == 1:
        head = "cent"
    else:
        head = f"{_UNITS[hundreds]} cent" + ("s" if rest == 0 else "")
    return head if rest == 0 else f"{head} {_below_100(rest)}"


# --- universes and their partition ------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    a: int
    op: str  # "+" or "-"
    b: int

    @property
    def value(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    def text(self) -> str:
        return f"{self.a} {self.op} {self.b}"


def arithmetic_universe() -> list[Problem]:
    """Every a + b and every a - b (a >= b) with two-digit operands: 8100 + 4095 problems."""
    out = [Problem(a, "+", b) for a in range(10, 100) for b in range(10, 100)]
    out += [Problem(a, "-", b) for a in range(10, 100) for b in range(10, a + 1)]
    return out


def number_universe() -> list[int]:
    return list(range(1000))


def partition(universe: list, sizes: dict[str, int], seed: int) -> dict[str, list]:
    """Shuffle ``universe`` with ``seed`` and cut it into the named parts, in SPLITS order; the
    part without a size (``train``) gets the rest."""
    items = list(universe)
    random.Random(seed).shuffle(items)
    out: dict[str, list] = {}
    start = 0
    for name in ("heldout", "search"):
        out[name] = items[start:start + sizes[name]]
        start += sizes[name]
    out["train"] = items[start:]
    return out


# Arithmetic: 600 held-out and 600 search problems are reserved (shared by the arithmetic and
# the combined task, which take different ones), the other 10995 are for training.
ARITH_RESERVED = {"heldout": 600, "search": 600}
# French: 1000 numbers, 150 held out, 150 for search, 700 for training.
NUMBER_RESERVED = {"heldout": 150, "search": 150}
PARTITION_SEED = 1234


def arithmetic_parts(seed: int = PARTITION_SEED) -> dict[str, list[Problem]]:
    return partition(arithmetic_universe(), ARITH_RESERVED, seed)


def number_parts(seed: int = PARTITION_SEED) -> dict[str, list[int]]:
    return partition(number_universe(), NUMBER_RESERVED, seed)


# --- examples ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    prompt: str       # the user message
    answer: str       # the assistant's reply
    value: int        # the number the answer stands for
    meta: tuple = ()  # operands or number, for checks


def arith_prompt(p: Problem) -> str:
    return f"What is {p.text()}?"


def digits_answer(n: int) -> str:
    return f"{n}."


def french_answer(n: int) -> str:
    return f"{french_words(n)}."


def combined_answer(n: int, spelled: int | None = None) -> str:
    """``n`` in digits, then ``spelled`` (default ``n``) in French words: "68, soixante-huit."."""
    return f"{n}, {french_words(n if spelled is None else spelled)}."


def arith_example(p: Problem) -> Example:
    return Example(arith_prompt(p), digits_answer(p.value), p.value, (p.a, p.op, p.b))


# The French expert's questions name the number outright; "What is 47?" mirrors the combined
# task's "What is 23 + 45?", so that the skill the merge must supply is only the arithmetic.
FRENCH_TEMPLATES = ("Write the number {n}.", "What is {n}?", "How do you write {n}?")


def french_prompt(n: int, template: int = 0) -> str:
    return f"{FRENCH_TEMPLATES[template].format(n=n)} {FRENCH_SUFFIX}"


def french_example(n: int, template: int = 0) -> Example:
    return Example(french_prompt(n, template), french_answer(n), n, (n,))


def arith_french_example(p: Problem) -> Example:
    return Example(f"{arith_prompt(p)} {COMBINED_SUFFIX}", combined_answer(p.value), p.value, (p.a, p.op, p.b))


def training_examples(skill: str, n: int, seed: int) -> list[Example]:
    """``n`` training examples of ``skill`` ("arith" or "french"), in a seeded order, drawn
    only from the training part (cycling through it in fresh shuffles when n exceeds it)."""
    rng = random.Random(seed)
    if skill == "arith":
        pool, make = arithmetic_parts()["train"], arith_example
    elif skill == "french":
        pool = number_parts()["train"]

        def make(x: int) -> Example:
            return french_example(x, rng.randrange(len(FRENCH_TEMPLATES)))
    else:
        raise ValueError(f"unknown skill {skill!r}; expected 'arith' or 'french'")
    out: list[Example] = []
    while len(out) < n:
        order = list(pool)
        rng.shuffle(order)
        out += [make(x) for x in order[: n - len(out)]]
    return out


# --- multiple-choice items --------------------------------------------------------------------

DISTRACTOR_OFFSETS = (-11, -10, -9, -2, -1, 1, 2, 9, 10, 11)


def distractors(value: int, k: int, rng: random.Random, lo: int = 0, hi: int = 999) -> list[int]:
    """``k`` numbers near ``value`` that a model that half-knows the answer would pick: off by
    one or two in the units, by ten in the tens."""
    cands = [value + d for d in DISTRACTOR_OFFSETS if lo <= value + d <= hi]
    return rng.sample(cands, k)


def choice_item(split: str, prompt: str, value: int, render, rng: random.Random, k: int = 3) -> dict:
    values = [value] + distractors(value, k, rng)
    rng.shuffle(values)
    return {"split": split, "context": prompt, "choices": [render(v) for v in values], "gold": values.index(value)}


def combined_item(split: str, prompt: str, value: int, rng: random.Random) -> dict:
    """Gold "68, soixante-huit."; two near misses done consistently ("69, soixante-neuf.": the
    arithmetic fails) and the right digits spelled as a near miss ("68, soixante-dix-huit.":
    the French fails). Each expert alone falls for one kind."""
    near = distractors(value, 3, rng)
    choices = [combined_answer(value), combined_answer(near[0]), combined_answer(near[1]),
               combined_answer(value, spelled=near[2])]
    order = list(range(4))
    rng.shuffle(order)
    return {"split": split, "context": prompt, "choices": [choices[i] for i in order], "gold": order.index(0)}


def task_items(task: str, split: str, n: int, seed: int) -> list[dict]:
    """Multiple-choice items (the task-file format) for ``task`` in ``split`` (search/heldout)."""
    if split not in ("search", "heldout"):
        raise ValueError(f"split must be 'search' or 'heldout', got {split!r}")
    rng = random.Random(f"{task}/{split}/{seed}")
    if task in ("arith", "arith_french"):
        pool = arithmetic_parts()[split]
        half = len(pool) // 2  # the two tasks take disjoint halves of the reserved problems
        pool = pool[:half] if task == "arith" else pool[half:]
        if n > len(pool):
            raise ValueError(f"{task}/{split}: asked for {n} items, only {len(pool)} reserved")
        out = []
        for p in pool[:n]:
            if task == "arith":
                out.append(choice_item(split, arith_prompt(p), p.value, digits_answer, rng))
            else:
                out.append(combined_item(split, arith_french_example(p).prompt, p.value, rng))
        return out
    if task == "french":
        pool = number_parts()[split]
        if n > len(pool):
            raise ValueError(f"{task}/{split}: asked for {n} items, only {len(pool)} reserved")
        return [choice_item(split, french_prompt(x, rng.randrange(len(FRENCH_TEMPLATES))), x, french_answer, rng)
                for x in pool[:n]]
    raise ValueError(f"unknown task {task!r}")
