"""lm-evaluation-harness tasks (``lm_eval:NAME``) scored by the workbench's evaluator.

The reference is lm-eval itself: ``lm_eval.simple_evaluate`` with ``HFLM`` over the same model
object, on local task YAMLs over local JSON data written here (nothing is downloaded).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import save_tiny_model

lm_eval = pytest.importorskip("lm_eval", reason="lm_eval:NAME tasks need the workbench[lm-eval] extra")

from workbench.eval.evaluator import evaluate  # noqa: E402
from workbench.eval.lm_eval_tasks import LmEvalOptions  # noqa: E402
from workbench.eval.scoring import reference_logprobs  # noqa: E402
from workbench.eval.taskfile import TaskError, check_search_objective, load_task  # noqa: E402


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(3, 96)}" for _ in range(n))


def write_tasks(d: Path) -> Path:
    """Local lm-eval tasks over JSONL files (the tiny models' word vocabulary): multiple choice,
    multiple choice with 2 few-shot examples from a train split, and generate_until with a regex
    filter. Returns the include directory."""
    rng = random.Random(0)
    tasks = d / "tasks"
    tasks.mkdir(parents=True)

    def jsonl(name: str, rows: list[dict]) -> Path:
        p = d / name
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return p

    def mc_rows(n):
        return [{"question": _words(rng, 5), "choices": [_words(rng, rng.randrange(1, 4)) for _ in range(4)],
                 "label": rng.randrange(4)} for _ in range(n)]

    mc, mc_train = jsonl("mc.jsonl", mc_rows(40)), jsonl("mc_train.jsonl", mc_rows(8))
    gen = jsonl("gen.jsonl", [{"question": _words(rng, 5), "answer": f"w{rng.randrange(3, 96)}"} for _ in range(24)])
    mc_body = ('output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
               'doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    (tasks / "toy_mc.yaml").write_text(
        f"task: toy_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {mc}\n"
        f"test_split: test\n{mc_body}")
    (tasks / "toy_mc_fewshot.yaml").write_text(
        f"task: toy_mc_fewshot\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {mc}\n"
        f"    train: {mc_train}\ntest_split: test\ntraining_split: train\nfewshot_split: train\n"
        f"num_fewshot: 2\n{mc_body}")
    (tasks / "toy_mc_selfshot.yaml").write_text(   # few-shot examples drawn from its own test documents
        f"task: toy_mc_selfshot\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {mc}\n"
        f"test_split: test\nnum_fewshot: 1\n{mc_body}")
    (tasks / "toy_gen.yaml").write_text(
        f"task: toy_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {gen}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: \"{{question}} w3\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"w4\"]\n  do_sample: false\n"
        "  max_gen_toks: 6\nfilter_list:\n  - name: first_word\n    filter:\n"
        "      - function: regex\n        regex_pattern: \"(w\\\\d+)\"\n      - function: take_first\n"
        "metric_list:\n  - metric: exact_match\n")
    return tasks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("lmeval")
    model_dir = save_tiny_model(d / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return {"dir": d, "tasks": write_tasks(d), "model": model, "tok": tok, "model_dir": model_dir}


def reference(setup, name: str) -> dict:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=setup["model"], tokenizer=setup["tok"], batch_size=8)
    out = lm_eval.simple_evaluate(model=lm, tasks=[name], log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False))
    return {"results": out["results"][name], "samples": sorted(out["samples"][name], key=lambda s: s["doc_id"])}


def ours(setup, name: str, split: str = "all", **opts):
    task = load_task(f"lm_eval:{name}", LmEvalOptions(include_path=(str(setup["tasks"]),), **opts))
    (r,) = evaluate(setup["model"], setup["tok"], task, split=split, log_samples=True, batch_size=8).values()
    return task, r


@pytest.mark.parametrize("name", ["toy_mc", "toy_mc_fewshot"])
def test_multiple_choice_equals_simple_evaluate(setup, name):
    ref = reference(setup, name)
    task, r = ours(setup, name)
    assert r.items == len(ref["samples"]) == 40
    for metric in ("acc", "acc_norm"):
        assert abs(r.metrics[metric] - float(ref["results"][f"{metric},none"])) <= 1e-9, metric
    # the same requests (few-shot contexts included), the same log-likelihoods
    for mine, theirs in zip(sorted(r.samples, key=lambda s: s["doc_id"]), ref["samples"]):
        assert mine["arguments"] == [list(a) for a in theirs["arguments"]]
        lls_mine = np.array([x[0][0] for x in mine["resps"]])
        lls_ref = np.array([x[0][0] for x in theirs["resps"]])
        assert np.abs(lls_mine - lls_ref).max() <= 1e-4
    # the continuous fitness: the gold choice's softmax probability, from the same log-likelihoods
    probs = []
    for s in ref["samples"]:
        x = np.array([v[0][0] for v in s["resps"]])
        p = np.exp(x - x.max())
        probs.append(p[s["target"]] / p.sum())
    assert r.metrics["score"] == pytest.approx(float(np.mean(probs)), abs=1e-5)


def test_chat_template_requests_equal_simple_evaluate(setup):
    """With the chat template asked for, the same rendered requests and scores as
    simple_evaluate(apply_chat_template=True)."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tok = setup["tok"]
    tok.chat_template = "{% for m in messages %}w5 {{ m['content'] }} w6 {% endfor %}{% if add_generation_prompt %}w7 {% endif %}"
    try:
        lm = HFLM(pretrained=setup["model"], tokenizer=tok, batch_size=8)
        ref = lm_eval.simple_evaluate(model=lm, tasks=["toy_mc"], log_samples=True, bootstrap_iters=0,
                                      apply_chat_template=True,
                                      task_manager=TaskManager(include_path=str(setup["tasks"]), include_defaults=False))
        _, r = ours(setup, "toy_mc", chat_template=True)
    finally:
        tok.chat_template = None
    theirs = sorted(ref["samples"]["toy_mc"], key=lambda s: s["doc_id"])
    mine = sorted(r.samples, key=lambda s: s["doc_id"])
    assert mine[0]["arguments"][0][0].startswith("w5 ")           # the template was applied
    assert [m["arguments"] for m in mine] == [[list(a) for a in t["arguments"]] for t in theirs]
    assert abs(r.metrics["acc"] - float(ref["results"]["toy_mc"]["acc,none"])) <= 1e-9


def test_generate_until_with_a_regex_filter_equals_simple_evaluate(setup):
    ref = reference(setup, "toy_gen")
    task, r = ours(setup, "toy_gen")
    key = "exact_match,first_word"
    assert abs(r.metrics[key] - float(ref["results"][key])) <= 1e-9
    mine = sorted(r.samples, key=lambda s: s["doc_id"])
    assert [m["resps"][0][0] for m in mine] == [t["resps"][0][0] for t in ref["samples"]]   # the generations
    assert [m["filtered_resps"]["first_word"][0] for m in mine] == [t["filtered_resps"][0] for t in ref["samples"]]
    # the continuous fitness: exp(mean log-prob) of " " + the gold answer after the prompt
    model, tok = setup["model"], setup["tok"]
    want = []
    for t in ref["samples"]:
        ctx = tok(t["arguments"][0][0], add_special_tokens=False)["input_ids"]
        whole = tok(t["arguments"][0][0] + " " + t["target"], add_special_tokens=False)["input_ids"]
        lp = reference_logprobs(model, ctx, whole[len(ctx):])
        want.append(math.exp(float(lp.mean())))
    assert r.metrics["score"] == pytest.approx(float(np.mean(want)), rel=1e-4)
    assert 0 < r.metrics["score"] < 1


def test_splits_are_seeded_disjoint_and_recorded(setup):
    inc = (str(setup["tasks"]),)
    a = load_task("lm_eval:toy_mc", LmEvalOptions(include_path=inc, seed=3))
    b = load_task("lm_eval:toy_mc", LmEvalOptions(include_path=inc, seed=3))
    c = load_task("lm_eval:toy_mc", LmEvalOptions(include_path=inc, seed=4))
    docs = {s: [it.line for it in a.split_items(s)] for s in ("search", "heldout")}
    assert not set(docs["search"]) & set(docs["heldout"])
    assert len(docs["search"]) == 20 and len(docs["heldout"]) == 20     # defaults: half, then the rest
    assert docs == {s: [it.line for it in b.split_items(s)] for s in ("search", "heldout")}
    assert docs["search"] != [it.line for it in c.split_items("search")]
    assert a.fingerprint == b.fingerprint != c.fingerprint
    sized = load_task("lm_eval:toy_mc", LmEvalOptions(include_path=inc, seed=3, search_docs=5, heldout_docs=7))
    assert [len(sized.split_items(s)) for s in ("search", "heldout")] == [5, 7]
    # a split scores only its own documents
    _, full = ours(setup, "toy_mc")
    _, search = ours(setup, "toy_mc", split="search", seed=3)
    by_doc = {s["doc_id"]: s["acc"] for s in full.samples}
    assert {s["doc_id"] for s in search.samples} == set(docs["search"])
    assert search.metrics["acc"] == pytest.approx(np.mean([by_doc[i] for i in docs["search"]]), abs=1e-12)


def test_search_objective_guards(setup):
    inc = (str(setup["tasks"]),)
    task = load_task("lm_eval:toy_mc", LmEvalOptions(include_path=inc))
    check_search_objective(task, "search")
    with pytest.raises(TaskError, match="held out"):
        check_search_objective(task, "heldout")
    selfshot = load_task("lm_eval:toy_mc_selfshot", LmEvalOptions(include_path=inc))
    with pytest.raises(TaskError, match="few-shot examples are drawn from the evaluation documents"):
        check_search_objective(selfshot, "search")
    fewshot = load_task("lm_eval:toy_mc_fewshot", LmEvalOptions(include_path=inc))
    check_search_objective(fewshot, "search")   # its shots come from a train split


def test_bad_references_get_one_line_errors(setup, tmp_path):
    inc = (str(setup["tasks"]),)
    with pytest.raises(TaskError, match=r"lm_eval:toy_mcq: no lm-eval task 'toy_mcq'.*similar: .*toy_mc"):
        load_task("lm_eval:toy_mcq", LmEvalOptions(include_path=inc))
    with pytest.raises(TaskError, match="include_path: .* is not a directory"):
        load_task("lm_eval:toy_mc", LmEvalOptions(include_path=(str(tmp_path / "nope"),)))
    with pytest.raises(TaskError, match="search_docs 30 \\+ heldout_docs 20"):
        load_task("lm_eval:toy_mc", LmEvalOptions(include_path=inc, search_docs=30, heldout_docs=20))
    with pytest.raises(TaskError, match="num_fewshot: expected an integer >= 0, got -1"):
        load_task("lm_eval:toy_mc", LmEvalOptions(include_path=inc, num_fewshot=-1))
    with pytest.raises(TaskError, match="expected lm_eval:TASK_NAME"):
        load_task("lm_eval:")


def test_search_spec_takes_lm_eval_objectives(setup, tmp_path):
    from workbench.search.objective import Objective
    from workbench.search.spec import SpecError, load_spec

    (tmp_path / "tasks").symlink_to(setup["tasks"], target_is_directory=True)
    spec_file = tmp_path / "s.yml"
    spec_file.write_text(f"models: [{setup['model_dir']}, {setup['model_dir']}]\nmerge_method: linear\n"
                         "evolve: {weight: [0, 1]}\nobjective: [{task: 'lm_eval:toy_mc'}]\n"
                         "report_tasks: ['lm_eval:toy_gen']\nlm_eval: {include_path: [tasks], seed: 5}\n")
    spec = load_spec(spec_file)
    assert spec.lm_eval.include_path == (str(tmp_path / "tasks"),) and spec.lm_eval.seed == 5
    assert spec.to_dict()["lm_eval"]["seed"] == 5
    objective = Objective(spec)
    fit = objective(setup["model"], setup["tok"])
    _, direct = ours(setup, "toy_mc", split="search", seed=5)
    assert fit.score == pytest.approx(direct.metrics["score"], abs=1e-9)
    spec_file.write_text(spec_file.read_text().replace("seed: 5", "seeds: 5"))
    with pytest.raises(SpecError, match=r"s\.yml:6: lm_eval\.seeds: unknown"):
        load_spec(spec_file)


def test_eval_command_scores_lm_eval_tasks(setup, tmp_path):
    from workbench.cli import main

    out = tmp_path / "r.json"
    rc = main(["eval", str(setup["model_dir"]), "lm_eval:toy_mc", "lm_eval:toy_gen", "--include-path",
               str(setup["tasks"]), "--split", "heldout", "--json", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads(out.read_text())
    _, direct = ours(setup, "toy_mc", split="heldout")
    assert data["lm_eval:toy_mc"]["acc"] == pytest.approx(direct.metrics["acc"], abs=1e-12)
    assert data["lm_eval:toy_mc"]["items"] == 20 and data["lm_eval:toy_gen"]["items"] == 12
    assert data["lm_eval:toy_mc"]["documents"] == direct.documents and len(direct.documents) == 20
    assert "exact_match,first_word" in data["lm_eval:toy_gen"]


def tiny_gguf(d: Path) -> Path:
    """A small ternary llama with a byte-level BPE tokenizer, exported by `workbench export gguf`'s code."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from test_export_gguf import BASE_CFG, _bpe_tokenizer
    from workbench.export.gguf import export_gguf
    from workbench.quant.config import quant_config_from_dict
    from workbench.quant.model import quantize_model, save_quantized

    src = d / "src"
    n_tok = _bpe_tokenizer(src)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=n_tok + 12, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    cfg = {k: v for k, v in BASE_CFG.items() if k != "lora"}
    quantize_model(model, quant_config_from_dict(cfg))
    export_gguf(save_quantized(model, d / "q", src), d / "tiny.gguf")
    return d / "tiny.gguf"


def test_eval_reads_a_gguf_file_once_into_the_home(tmp_path, monkeypatch):
    from workbench.models import gguf_import
    from workbench.ops.evaluate import evaluate as ops_evaluate

    gguf = tiny_gguf(tmp_path)
    task = tmp_path / "ppl.yml"
    task.write_text("name: ppl\ntype: perplexity\nitems: ppl.jsonl\nmax_length: 64\nmax_tokens: 256\n")
    (tmp_path / "ppl.jsonl").write_text(json.dumps({"split": "heldout", "file": "{os_licenses}/GPL-3"}) + "\n")
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    events = []
    first = ops_evaluate(gguf, [str(task)], split="heldout", progress=events.append)
    cached = gguf_import.gguf_cache_dir(gguf)
    assert (cached / "model.safetensors").is_file() and str(cached).startswith(str(tmp_path / "home"))
    assert any(e.stage.startswith("import tiny.gguf") for e in events)
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    events.clear()
    second = ops_evaluate(gguf, [str(task)], split="heldout", progress=events.append)
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp          # imported once
    assert not any(e.stage.startswith("import") for e in events)
    # the cached import scores as transformers' own GGUF loader does
    model, tok = gguf_import.load_gguf_with_transformers(gguf)
    (direct,) = evaluate(model, tok, str(task), split="heldout").values()
    ppl = first["ppl"].metrics["ppl"]
    assert second["ppl"].metrics["ppl"] == ppl
    assert ppl == pytest.approx(direct.metrics["ppl"], rel=1e-5)
    # a changed file is imported again
    gguf.write_bytes(gguf.read_bytes())
    assert gguf_import.gguf_cache_dir(gguf) != cached


def test_search_on_an_lm_eval_objective_reports_its_heldout_split(tiny_models, setup, tmp_path):
    """`workbench search` with lm_eval objective and report tasks: each candidate scored on the
    task's search documents, the report on its held-out documents, the seed in the run's spec."""
    import yaml

    from workbench.cli import main
    from workbench.search.run import read_history

    base, a, b = tiny_models("llama", 3)
    spec = {"name": "lm", "base_model": str(base), "models": [str(a), str(b)], "merge_method": "ties",
            "evolve": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}, "fixed": {"normalize": True},
            "objective": [{"task": "lm_eval:toy_mc"}], "report_tasks": ["lm_eval:toy_gen"],
            "lm_eval": {"include_path": [str(setup["tasks"])], "seed": 2, "search_docs": 10, "heldout_docs": 12},
            "budget": {"generations": 2, "population": 3}, "seed": 1}
    (tmp_path / "s.yml").write_text(yaml.safe_dump(spec))
    run = tmp_path / "run"
    assert main(["search", str(tmp_path / "s.yml"), "--out", str(run), "--no-progress"]) == 0
    rows = read_history(run)
    assert all(r["tasks"]["lm_eval:toy_mc"]["items"] == 10 and 0 < r["score"] < 1 for r in rows)
    assert json.loads((run / "spec.yml").read_text())["lm_eval"]["seed"] == 2
    report = json.loads((run / "report.json").read_text())
    assert report["tasks"] == ["lm_eval:toy_mc", "lm_eval:toy_gen"]
    for entry in report["entries"]:
        assert 0 <= entry["heldout"]["lm_eval:toy_mc"]["acc"] <= 1
        assert "exact_match,first_word" in entry["heldout"]["lm_eval:toy_gen"]
    assert "exact_match,first_word" in (run / "report.md").read_text()
    splits = report["lm_eval_splits"]["lm_eval:toy_mc"]
    assert splits["seed"] == 2 and len(splits["search"]) == 10 and len(splits["heldout"]) == 12
    assert not set(splits["search"]) & set(splits["heldout"])


def test_a_search_refuses_an_lm_eval_task_that_does_not_load_before_any_model_loads(tiny_models, setup, tmp_path,
                                                                                    capsys, monkeypatch):
    """A report task misspelled: one line naming the spec and the field, and no source is read."""
    import yaml

    from workbench.cli import main
    from workbench.search import candidates

    base, a, b = tiny_models("llama", 3)
    spec = {"name": "lm", "base_model": str(base), "models": [str(a), str(b)], "merge_method": "linear",
            "evolve": {"weight": [0.0, 1.0]}, "objective": [{"task": "lm_eval:toy_mc"}],
            "report_tasks": ["lm_eval:toy_genn"], "lm_eval": {"include_path": [str(setup["tasks"])]},
            "budget": {"generations": 1, "population": 2}}
    (tmp_path / "s.yml").write_text(yaml.safe_dump(spec))

    def no_loading(*args, **kwargs):
        raise AssertionError("a source was loaded")

    monkeypatch.setattr(candidates.InMemoryMerger, "__init__", no_loading)
    capsys.readouterr()
    assert main(["search", str(tmp_path / "s.yml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = (captured.out + captured.err).strip()
    assert err.count("\n") == 0 and "s.yml: report_tasks: lm_eval:toy_genn: no lm-eval task 'toy_genn'" in err
