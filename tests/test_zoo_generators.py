"""The zoo's seeded generators: deterministic, disjoint splits, correct answers."""

from __future__ import annotations

import re

import pytest

from workbench.zoo import generators as gen

# An independent reference for French number names: a table typed from a French grammar
# (traditional spelling), covering every irregular form, and a second, differently built routine.
FRENCH_TABLE = {
    0: "zéro", 1: "un", 7: "sept", 10: "dix", 11: "onze", 15: "quinze", 16: "seize", 17: "dix-sept",
    19: "dix-neuf", 20: "vingt", 21: "vingt et un", 22: "vingt-deux", 30: "trente", 31: "trente et un",
    45: "quarante-cinq", 51: "cinquante et un", 60: "soixante", 61: "soixante et un", 69: "soixante-neuf",
    70: "soixante-dix", 71: "soixante et onze", 72: "soixante-douze", 76: "soixante-seize",
    77: "soixante-dix-sept", 79: "soixante-dix-neuf", 80: "quatre-vingts", 81: "quatre-vingt-un",
    85: "quatre-vingt-cinq", 90: "quatre-vingt-dix", 91: "quatre-vingt-onze", 96: "quatre-vingt-seize",
    97: "quatre-vingt-dix-sept", 99: "quatre-vingt-dix-neuf", 100: "cent", 101: "cent un",
    121: "cent vingt et un", 180: "cent quatre-vingts", 181: "cent quatre-vingt-un", 200: "deux cents",
    201: "deux cent un", 271: "deux cent soixante et onze", 300: "trois cents", 580: "cinq cent quatre-vingts",
    999: "neuf cent quatre-vingt-dix-neuf",
}

_ONES = "zéro un deux trois quatre cinq six sept huit neuf".split()
_TEENS = {10: "dix", 11: "onze", 12: "douze", 13: "treize", 14: "quatorze", 15: "quinze", 16: "seize"}


def reference_french(n: int) -> str:
    """Built from digits, the other way round: units first, then how they attach to the tens."""
    h, t, u = n // 100, n // 10 % 10, n % 10
    if t in (1, 7, 9) and (t * 10 + u - (60 if t == 7 else 80 if t == 9 else 0)) in _TEENS:
        low = t * 10 + u - (60 if t == 7 else 80 if t == 9 else 0)
        tens_word = {1: "", 7: "soixante", 9: "quatre-vingt"}[t]
        teen = _TEENS[low]
        if not tens_word:
            two = teen
        elif t == 7 and low == 11:
            two = "soixante et onze"
        else:
            two = f"{tens_word}-{teen}"
    elif t in (1, 7, 9):  # 17-19, 77-79, 97-99
        base = {1: "dix", 7: "soixante-dix", 9: "quatre-vingt-dix"}[t]
        two = f"{base}-{_ONES[u]}"
    else:
        tens_word = {0: "", 2: "vingt", 3: "trente", 4: "quarante", 5: "cinquante", 6: "soixante",
                     8: "quatre-vingt"}[t]
        if not tens_word:
            two = _ONES[u] if (u or not h) else ""
        elif u == 0:
            two = tens_word + ("s" if t == 8 else "")
        elif u == 1 and t != 8:
            two = f"{tens_word} et un"
        else:
            two = f"{tens_word}-{_ONES[u]}"
    if h == 0:
        return two
    head = "cent" if h == 1 else f"{_ONES[h]} cent"
    if not two:
        return head + ("s" if h > 1 else "")
    return f"{head} {two}"


def test_french_words_match_a_table_and_an_independent_routine():
    for n, words in FRENCH_TABLE.items():
        assert gen.french_words(n) == words, n
    for n in range(1000):
        assert gen.french_words(n) == reference_french(n), n
    assert len({gen.french_words(n) for n in range(1000)}) == 1000
    with pytest.raises(ValueError):
        gen.french_words(1000)


def test_partitions_are_disjoint_and_cover_the_universe():
    parts = gen.arithmetic_parts()
    sets = {k: set(v) for k, v in parts.items()}
    assert len(parts["heldout"]) == gen.ARITH_RESERVED["heldout"] and len(parts["search"]) == gen.ARITH_RESERVED["search"]
    assert not (sets["train"] & sets["search"]) and not (sets["train"] & sets["heldout"])
    assert not (sets["search"] & sets["heldout"])
    assert set().union(*sets.values()) == set(gen.arithmetic_universe())
    assert len(gen.arithmetic_universe()) == 90 * 90 + 90 * 91 // 2
    nums = {k: set(v) for k, v in gen.number_parts().items()}
    assert not (nums["train"] & nums["search"]) and not (nums["train"] & nums["heldout"])
    assert not (nums["search"] & nums["heldout"])
    assert set().union(*nums.values()) == set(range(1000))
    assert gen.arithmetic_parts() == parts  # the partition is a function of its seed
    assert gen.arithmetic_parts(seed=5) != parts


def test_training_examples_are_seeded_and_come_only_from_the_training_part():
    a = gen.training_examples("arith", 300, seed=3)
    assert a == gen.training_examples("arith", 300, seed=3)
    assert a != gen.training_examples("arith", 300, seed=4)
    train = set(gen.arithmetic_parts()["train"])
    assert all(gen.Problem(*e.meta) in train for e in a)
    f = gen.training_examples("french", 1500, seed=3)  # more than the 700 numbers: cycles
    assert f == gen.training_examples("french", 1500, seed=3)
    assert {e.meta[0] for e in f} == set(gen.number_parts()["train"])
    shapes = {re.sub(r"\d+", "N", e.prompt) for e in f}  # every template is used
    assert shapes == {t.format(n="N") + " Answer in French words." for t in gen.FRENCH_TEMPLATES}
    with pytest.raises(ValueError):
        gen.training_examples("latin", 3, 0)


def _parse_arith(prompt: str) -> tuple[int, str, int]:
    m = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?( Answer in digits, then in French words\.)?", prompt)
    assert m, prompt
    return int(m.group(1)), m.group(2), int(m.group(3))


def _parse_french(prompt: str) -> int:
    m = re.fullmatch(r"(?:Write the number (\d+)\.|What is (\d+)\?|How do you write (\d+)\?) Answer in French words\.",
                     prompt)
    assert m, prompt
    return int(next(g for g in m.groups() if g))


def _apply(a: int, op: str, b: int) -> int:
    return {"+": int.__add__, "-": int.__sub__}[op](a, b)


def test_training_answers_are_correct():
    for e in gen.training_examples("arith", 2000, seed=0):
        a, op, b = _parse_arith(e.prompt)
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert e.answer == f"{_apply(a, op, b)}." and _apply(a, op, b) >= 0
    for e in gen.training_examples("french", 700, seed=0):
        n = _parse_french(e.prompt)
        assert e.answer == reference_french(n) + "."


@pytest.mark.parametrize("task", ["arith", "french", "arith_french"])
def test_task_items_are_correct_and_disjoint(task):
    search = gen.task_items(task, "search", 100, seed=0)
    heldout = gen.task_items(task, "heldout", 150, seed=0)
    assert search == gen.task_items(task, "search", 100, seed=0)
    keys = {}
    for split, items in (("search", search), ("heldout", heldout)):
        for it in items:
            assert it["split"] == split and len(it["choices"]) == 4 and len(set(it["choices"])) == 4
            if task == "french":
                key = _parse_french(it["context"])
                value = key
            else:
                key = _parse_arith(it["context"])
                value = _apply(*key)
            gold = it["choices"][it["gold"]]
            if task == "arith_french":   # digits, then French words; one choice spells the digits wrong
                assert gold == f"{value}, {reference_french(value)}."
                parsed = [(int(c.split(", ")[0]), c.split(", ")[1]) for c in it["choices"]]
                consistent = [d for d, w in parsed if w == reference_french(d) + "."]
                assert len(consistent) == 3 and [d for d, _ in parsed].count(value) == 2
            else:
                assert gold == (f"{value}." if task == "arith" else reference_french(value) + ".")
            # no choice is a prefix of another (log-likelihood scoring would favour it)
            assert not any(x != y and y.startswith(x) for x in it["choices"] for y in it["choices"])
            keys.setdefault(split, set()).add(key)
    assert not keys["search"] & keys["heldout"]
    if task == "french":
        train = set(gen.number_parts()["train"])
    else:
        train = {(p.a, p.op, p.b) for p in gen.arithmetic_parts()["train"]}
    assert not (keys["search"] | keys["heldout"]) & train
    golds = [it["gold"] for it in search + heldout]
    assert len(set(golds)) == 4  # the gold position is shuffled


def test_arith_and_combined_tasks_use_different_problems():
    for split in ("search", "heldout"):
        a = {_parse_arith(it["context"]) for it in gen.task_items("arith", split, 300, 0)}
        c = {_parse_arith(it["context"]) for it in gen.task_items("arith_french", split, 300, 0)}
        assert len(a) == 300 and len(c) == 300 and not a & c
