"""Racing: a candidate that wins on the full split is never stopped; a clearly worse one is."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import yaml
from conftest import VOCAB, save_tiny_model, tiny_tokenizer

from workbench.errors import WorkbenchError
from workbench.eval import evaluate, load_task
from workbench.eval.racing import (
    Race,
    bernstein_serfling_upper,
    race_order,
    race_values,
    t_quantile,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def population(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    if kind == "bernoulli":
        return (rng.random(n) < rng.uniform(0.2, 0.8)).astype(float)
    if kind == "beta":
        return rng.beta(rng.uniform(0.5, 3), rng.uniform(0.5, 3), n)
    return np.clip(rng.normal(0.3, 0.05, n), 0, 1)  # low spread: the normal bound is tight here


def winners_stopped(kind: str, bound: str, trials: int = 200) -> dict[float, float]:
    """Races of candidates whose full-split score beats the incumbent by a margin: the stop rate."""
    rng = np.random.default_rng(0)
    stopped = {m: 0 for m in MARGINS}
    for trial in range(trials):
        n = int(rng.choice([40, 100, 250]))
        values = population(rng, kind, n)[race_order(n, seed=trial)]
        full = float(values.mean())
        for margin in MARGINS:
            race = race_values(values, full - margin, chunk=int(rng.choice([5, 10, 25])), bound=bound)
            stopped[margin] += race.stopped
            if not race.stopped:
                assert len(race.values) == n and race.estimate() == pytest.approx(full)
    return {m: k / trials for m, k in stopped.items()}


MARGINS = (1e-9, 0.01, 0.03)


@pytest.mark.parametrize("bound", ["normal", "bernstein"])
@pytest.mark.parametrize("kind", ["bernoulli", "beta", "narrow"])
def test_race_rarely_stops_a_winner(kind, bound):
    """The guarantee: a winner is stopped with probability at most 1 - confidence = 5%."""
    rate = winners_stopped(kind, bound)
    assert max(rate.values()) <= 0.05, rate
    assert rate[0.03] <= 0.01, rate              # winners by 3 points: (almost) never
    if bound == "bernstein":
        assert max(rate.values()) == 0, rate     # the valid, conservative bound: never


def test_race_with_a_bad_start_is_not_stopped():
    # 200 items, mean 0.5: the first 20 hold 7 ones (0.35), the first 40 hold 16 (0.4)
    values = np.array([1.0, 0.0, 0.0] * 7 + [0.0] + [1.0, 0.0] * 9 + [1.0] * 8 + [1.0, 0.0] * 76)
    assert values.size == 200 and values.mean() == 0.5
    assert values[:20].mean() == 0.35 and values[:40].mean() == 0.4
    for bound in ("normal", "bernstein"):
        race = race_values(values, 0.49, chunk=20, bound=bound)
        assert not race.stopped and len(race.values) == 200


@pytest.mark.parametrize("bound, most_items", [("normal", 30), ("bernstein", 300)])
def test_race_stops_a_clearly_worse_candidate(bound, most_items):
    rng = np.random.default_rng(1)
    values = rng.beta(2, 6, 400)        # mean 0.25 against an incumbent at 0.45
    race = race_values(values, 0.45, chunk=10, bound=bound)
    assert race.stopped and len(race.values) <= most_items
    assert race.estimate() == pytest.approx(values[:len(race.values)].mean())
    assert race_values(values, None, chunk=10).stopped is False     # no incumbent: never stops


def test_bounds_by_hand():
    x = np.array([0.0, 1.0, 1.0, 0.0])
    log_term = np.log(5 / 0.1)
    expected = 0.5 + 0.5 * np.sqrt(2 * (1 - 3 / 100) * log_term / 4) + (7 / 3 + 3 / np.sqrt(2)) * log_term / 4
    assert bernstein_serfling_upper(x, 100, 0.1) == pytest.approx(expected)
    race = Race(total=10, incumbent=0.5, chunk=4, bound="bernstein")
    race.add([0.2, 0.2, 0.2, 0.2])      # whatever the bound, the unseen six can add at most 6
    assert race.upper_bound() == pytest.approx((0.8 + 6 * 1.0) / 10)
    race = Race(total=100, incumbent=0.5, chunk=10)
    race.add(list(np.linspace(0, 1, 10)))      # normal bound: not before the second chunk
    assert race.upper_bound() == 1.0 and not race.should_stop()
    race.add(list(np.linspace(0, 1, 10)))
    m, s = 0.5, float(np.std(np.linspace(0, 1, 10).tolist() * 2, ddof=1))
    half = t_quantile(1 - 0.05 / 9, 19) * s / np.sqrt(20) * np.sqrt(80 / 99)
    assert race.upper_bound() == pytest.approx(m + half)
    assert t_quantile(0.975, 10) == pytest.approx(2.228, abs=1e-3)


def write_task(d, header, items, name="t"):
    (d / f"{name}.yml").write_text(yaml.safe_dump({"name": name, "items": f"{name}.jsonl", **header}))
    (d / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    return load_task(d / f"{name}.yml")


def test_evaluate_races_against_an_incumbent(tmp_path):
    model_dir = save_tiny_model(tmp_path / "m", "llama", seed=0)
    from transformers import AutoModelForCausalLM

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), tiny_tokenizer()
    rng = random.Random(0)
    items = [{"split": "search", "context": f"w{3 + i} " + " ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(5)),
              "choices": [f"w{rng.randrange(3, VOCAB)}" for _ in range(4)], "gold": rng.randrange(4)}
             for i in range(80)]
    task = write_task(tmp_path, {"type": "multiple_choice"}, items)
    full = evaluate(model, tok, task, log_samples=True)["t"]
    # a candidate that would win on the full split runs to the end and gets the same score
    won = evaluate(model, tok, task, incumbent=full.score - 1e-6, chunk=10)["t"]
    assert not won.stopped_early and won.items == 80
    assert won.score == pytest.approx(full.score, abs=1e-9)
    # against a far better incumbent it stops early, with the estimate over the items it used
    lost = evaluate(model, tok, task, incumbent=0.95, chunk=10, log_samples=True)["t"]
    assert lost.stopped_early and lost.items < 80 and lost.items % 10 == 0
    order = race_order(80)[:lost.items]
    assert sorted({s["item"] for s in lost.samples}) == sorted(order)
    assert lost.stderr["score"] > 0
    per_item = {}
    for s in full.samples:
        per_item.setdefault(s["item"], []).append(s["loglikelihood"])
    probs = [np.exp(per_item[i][items[i]["gold"]]) / np.exp(per_item[i]).sum() for i in order]
    assert lost.score == pytest.approx(np.mean(probs), abs=1e-6)
    assert lost.to_dict()["stopped_early"] is True
    with pytest.raises(WorkbenchError, match="incumbent: give"):
        evaluate(model, tok, [task, task], incumbent=0.5)

    ppl = write_task(tmp_path, {"type": "perplexity", "max_length": 8},
                     [{"split": "search", "text": " ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(200))}],
                     name="p")
    full_ppl = evaluate(model, tok, ppl)["p"]
    assert not evaluate(model, tok, ppl, incumbent=full_ppl.score * 0.99, chunk=4)["p"].stopped_early
    stopped = evaluate(model, tok, ppl, incumbent=0.9, chunk=4)["p"]
    assert stopped.stopped_early and stopped.items < full_ppl.items
