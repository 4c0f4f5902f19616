"""The combined task's error split: digits vs the French after them."""

import json
import random

import pytest

from workbench.zoo.composition import decompose, model_logliks
from workbench.zoo.generators import task_items


@pytest.fixture(scope="module")
def items():
    return task_items("arith_french", "heldout", 60, 0)


def _same_digits(item):
    g = item["choices"][item["gold"]].split(",")[0]
    return next(j for j, c in enumerate(item["choices"]) if j != item["gold"] and c.split(",")[0] == g)


def test_an_oracle_is_right_everywhere(items):
    lls = [[0.0 if j == it["gold"] else -5.0 for j in range(4)] for it in items]
    r = decompose(items, lls)
    assert r["acc"] == r["digits_right"] == r["spelled_right_given_digits"] == r["spell_pairwise"] == 100


def test_right_digits_spelled_wrong_counts_as_digits_only(items):
    lls = []
    for it in items:
        ll = [-9.0] * 4
        ll[_same_digits(it)], ll[it["gold"]] = 0.0, -1.0
        lls.append(ll)
    r = decompose(items, lls)
    assert (r["acc"], r["digits_right"], r["spelled_right_given_digits"], r["spell_pairwise"]) == (0, 100, 0, 0)


def test_random_scores_factor_and_match_a_direct_count(items):
    rng = random.Random(0)
    lls = [[rng.gauss(0, 1) for _ in range(4)] for _ in items]
    r = decompose(items, lls)
    direct = 100 * sum(max(range(4), key=ll.__getitem__) == it["gold"] for it, ll in zip(items, lls)) / len(items)
    assert r["acc"] == pytest.approx(direct)
    assert r["acc"] == pytest.approx(r["digits_right"] * r["spelled_right_given_digits"] / 100)
    assert 0 < r["acc"] < r["digits_right"] < 100


def test_items_without_one_same_digit_distractor_are_refused(items):
    bad = dict(items[0], choices=["1, un.", "2, deux.", "3, trois.", "4, quatre."], gold=0)
    with pytest.raises(ValueError, match="exactly one distractor"):
        decompose([bad], [[0.0] * 4])


def test_model_logliks_follow_the_evaluator(tiny_models, tmp_path):
    """Per-choice log-likelihoods from a tiny model on a task in the combined format: the split's
    items in file order, and the decomposition's accuracy is the evaluator's own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.eval.evaluator import evaluate
    from workbench.eval.taskfile import load_task

    rng = random.Random(0)
    lines = []
    for i in range(16):
        a, b, c, d = rng.sample(range(3, 60), 4)
        choices = [f"w{a}, w{b}.", f"w{a}, w{c}.", f"w{c}, w{d}.", f"w{d}, w{b}."]
        gold = rng.randrange(2)   # the gold answer or the same-digits one
        lines.append(json.dumps({"split": "search" if i < 12 else "heldout", "context": f"w{d} w{c}",
                                 "choices": choices, "gold": gold}))
    (tmp_path / "combined.jsonl").write_text("\n".join(lines) + "\n")
    path = tmp_path / "combined.yml"
    path.write_text("name: combined\ntype: multiple_choice\ndescription: a test task\nitems: combined.jsonl\n")

    model_dir = tiny_models("llama", 1)[0]
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    items, lls = model_logliks(model, tok, "search", limit=10, task=path)
    assert items == [json.loads(line) for line in lines[:10]]
    assert all(len(ll) == 4 and len(set(ll)) == 4 for ll in lls)
    acc = evaluate(model, tok, [load_task(path)], split="search", limit=10)["combined"].metrics["acc"]
    assert decompose(items, lls)["acc"] == pytest.approx(100 * acc)



@pytest.mark.parametrize("args, message", [
    (["{good}", "no-such-model"], "no-such-model: no such model"),
    (["{good}", "--split", "bogus"], "has no split 'bogus'"),
    (["{good}", "--limit", "0"], "--limit: expected a positive number"),
])
def test_the_command_checks_every_input_before_scoring(tiny_models, tmp_path, capsys, monkeypatch, args, message):
    """A bad model (after a good one), split or limit: exit 2 with the reason, before any model
    is loaded, and no JSON written."""
    import workbench.zoo.composition as composition

    def no_loading(_):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(composition, "load_candidate", no_loading)
    good = str(tiny_models("llama", 1)[0])
    out = tmp_path / "out.json"
    assert composition.main([a.format(good=good) for a in args] + ["--json", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
