"""`workbench eval`: JSON results and log-samples; and the real default model when it is prepared."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import VOCAB, save_tiny_model

from workbench.cli import main

SMOL = Path.home() / ".cache" / "workbench" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def write_task(d: Path, header: dict, items: list, name: str) -> Path:
    (d / f"{name}.yml").write_text(yaml.safe_dump({"name": name, "items": f"{name}.jsonl", **header}))
    (d / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    return d / f"{name}.yml"


def ref_ll(model, tok, context: str, continuation: str) -> float:
    c = tok(context, add_special_tokens=False).input_ids
    w = tok(context + continuation, add_special_tokens=False).input_ids
    assert w[:len(c)] == c
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([w])).logits[0].double(), -1)
    return sum(logp[j - 1, w[j]].item() for j in range(len(c), len(w)))


def test_cli_writes_json_and_log_samples(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "m", "mistral", seed=3)  # AutoTokenizer turns qwen2 into Qwen2Tokenizer
    rng = random.Random(0)
    w = lambda n: " ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(n))
    mc = write_task(tmp_path, {"type": "multiple_choice"},
                    [{"split": "search", "context": f"w{3 + i} {w(4)}", "choices": [w(2), w(1), w(3)], "gold": i % 3}
                     for i in range(6)], "mc")
    em = write_task(tmp_path, {"type": "exact_match", "max_new_tokens": 2, "stop": ["\n"]},
                    [{"split": "search", "prompt": f"w{3 + i} {w(3)}", "answers": [w(2)]} for i in range(3)], "em")
    ppl = write_task(tmp_path, {"type": "perplexity", "max_length": 8},
                     [{"split": "search", "text": w(20)}], "ppl")
    out, samples = tmp_path / "out" / "results.json", tmp_path / "samples.jsonl"
    rc = main(["eval", str(model_dir), str(mc), str(em), str(ppl), "--json", str(out), "--log-samples",
               str(samples), "--no-progress", "--threads", "1", "--batch-size", "4", "--limit", "5"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) == {"mc", "em", "ppl"}
    for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "score", "score_stderr", "items", "seconds"):
        assert key in res["mc"]
    assert res["mc"]["items"] == 5 and res["em"]["items"] == 3
    assert {"exact_match", "exact_match_stderr", "score"} <= set(res["em"])
    assert {"ppl", "ppl_stderr", "nll", "score", "tokens"} <= set(res["ppl"]) and res["ppl"]["tokens"] == 20
    lines = [json.loads(x) for x in samples.read_text().splitlines()]
    assert len([s for s in lines if s["task"] == "mc"]) == 15
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    for s in lines:
        assert {"task", "item", "context", "continuation", "loglikelihood"} <= set(s)
        if s["task"] != "ppl":
            assert s["loglikelihood"] == pytest.approx(ref_ll(model, tok, s["context"], s["continuation"]), abs=1e-4)
        if s["task"] == "em":
            assert isinstance(s["generation"], str)
    assert "evaluation" in capsys.readouterr().err    # the results table


def test_cli_errors_are_one_line(tmp_path, capsys):
    err = lambda: " ".join(capsys.readouterr().err.split())
    model_dir = save_tiny_model(tmp_path / "m", "llama")
    assert main(["eval", str(model_dir), "no_such_task", "--no-progress"]) == 2
    assert "no_such_task: no such task file or built-in task" in err()
    task = write_task(tmp_path, {"type": "multiple_choice"},
                      [{"split": "search", "context": "w5", "choices": ["w6", "w7"], "gold": 0}], "t")
    assert main(["eval", str(model_dir), str(task), "--split", "heldout", "--no-progress"]) == 2
    assert "has no split 'heldout'" in err()
    (model_dir / "model.safetensors").rename(model_dir / "weights.bin")
    assert main(["eval", str(model_dir), str(task), "--no-progress"]) == 2
    assert "no .safetensors weights" in err()


@pytest.mark.skipif(not (SMOL / "model.safetensors").is_file(), reason="SmolLM2-135M-Instruct is not prepared")
def test_smollm2_loglikelihoods_match_plain_forward(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.eval import evaluate, load_task

    model, tok = AutoModelForCausalLM.from_pretrained(SMOL).eval(), AutoTokenizer.from_pretrained(SMOL)
    items = [{"split": "search", "context": "The capital of France is", "choices": ["Paris", "Rome", "a city"],
              "gold": 0},
             {"split": "search", "context": "2 + 2 =", "choices": ["4", "5"], "gold": 0},
             {"split": "search", "context": "Water freezes at ", "choices": ["0 degrees", "100 degrees"], "gold": 0}]
    task = load_task(write_task(tmp_path, {"type": "multiple_choice"}, items, "smol"))
    res = evaluate(model, tok, task, log_samples=True, threads=1)["smol"]
    for s in res.samples:
        assert s["loglikelihood"] == pytest.approx(ref_ll(model, tok, s["context"], s["continuation"]), abs=1e-3)
    # the context's trailing space moves into the continuation, as in lm-eval; the samples show it
    assert [(s["context"], s["continuation"]) for s in res.samples][-2:] == [
        ("Water freezes at", "  0 degrees"), ("Water freezes at", "  100 degrees")]
