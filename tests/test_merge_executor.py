"""End-to-end merges of tiny models: results against independent computations, outputs that load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import save_tiny_model
from workbench.cli import main
from workbench.errors import RecipeError, WorkbenchError
from workbench.merge.executor import execute_merge
from workbench.merge.plan import plan_merge
from workbench.merge.recipe import parse_recipe


def state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory, read with the safetensors library (the reference reader)."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def merge(text: str, out: Path, recipe_dir: Path, **kwargs) -> Path:
    plan = plan_merge(parse_recipe(text, str(recipe_dir / "recipe.yml")))
    try:
        execute_merge(plan, out, **kwargs)
    finally:
        plan.close()
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_ties_output_matches_reference_and_generates(tiny_models, tmp_path, arch):
    base, a, b = tiny_models(arch, 3)
    out = merge(f"""
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.3, density: 0.5}}
""", tmp_path / "out", tmp_path)
    S, A, B, M = state(base), state(a), state(b), state(out)
    assert set(M) == set(S)
    for name in S:  # TIES written out per the paper: trim, elect sign, disjoint mean
        deltas = []
        for X in (A, B):
            d = (X[name] - S[name]).flatten()
            k = max(1, int(0.5 * d.numel()))
            keep = torch.zeros_like(d, dtype=torch.bool)
            keep[d.abs().argsort(descending=True)[:k]] = True
            deltas.append(torch.where(keep, d, torch.zeros_like(d)))
        w = torch.tensor([0.7, 0.3])[:, None]
        wd = torch.stack(deltas) * w
        sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
        agree = wd.sign() == sign
        num = (wd * agree).sum(0)
        den = (w * agree).sum(0)
        den[den == 0] = 1
        want = S[name] + (num / den).reshape(S[name].shape)
        torch.testing.assert_close(M[name], want, atol=1e-6, rtol=0, msg=name)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=5, do_sample=False)
    assert ids.shape == (1, 8)
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert "ties" in (out / "README.md").read_text() and (out / "mergekit_config.yml").is_file()


def test_gradient_and_filter_give_each_layer_its_value(tiny_models, tmp_path):
    base, a = tiny_models("llama", 2, num_layers=5)
    out = merge(f"""
merge_method: linear
models:
  - model: {base}
    parameters:
      weight: [{{filter: mlp, value: 1.0}}, {{value: [1.0, 0.0]}}]
  - model: {a}
    parameters:
      weight: [{{filter: mlp, value: 0.0}}, {{value: [0.0, 1.0]}}]
parameters: {{normalize: true}}
""", tmp_path / "out", tmp_path)
    S, A, M = state(base), state(a), state(out)
    for name in S:
        if ".mlp." in name:
            assert torch.equal(M[name], S[name]), name
            continue
        layer = int(name.split(".")[2]) if ".layers." in name else None
        t = layer / 4 if layer is not None else 0.0  # non-layer tensors sit at t = 0, like mergekit
        torch.testing.assert_close(M[name], (1 - t) * S[name] + t * A[name], atol=1e-6, rtol=0, msg=name)


def test_passthrough_slices_stack_the_right_layers(tiny_models, tmp_path):
    base, a = tiny_models("qwen2", 2, num_layers=4)
    out = merge(f"""
merge_method: passthrough
slices:
  - sources: [{{model: {base}, layer_range: [0, 3]}}]
  - sources: [{{model: {a}, layer_range: [1, 4]}}]
""", tmp_path / "out", tmp_path)
    S, A, M = state(base), state(a), state(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    if "layer_types" in cfg:
        assert len(cfg["layer_types"]) == 6
    sources = [(S, 0), (S, 1), (S, 2), (A, 1), (A, 2), (A, 3)]
    for out_layer, (src, src_layer) in enumerate(sources):
        names = [n for n in S if n.startswith(f"model.layers.{src_layer}.")]
        assert names
        for n in names:
            assert torch.equal(M[n.replace(f"layers.{src_layer}.", f"layers.{out_layer}.")], src[n])
    assert torch.equal(M["model.embed_tokens.weight"], S["model.embed_tokens.weight"])
    assert torch.equal(M["model.norm.weight"], A["model.norm.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6
    model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=3, do_sample=False)


def test_shards_dtype_and_index(tiny_models, tmp_path):
    base, a = tiny_models("llama", 2)
    out = merge(f"""
merge_method: linear
models:
  - {{model: {base}, parameters: {{weight: 1.0}}}}
  - {{model: {a}, parameters: {{weight: 0.0}}}}
out_dtype: bfloat16
""", tmp_path / "out", tmp_path, shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    S, M = state(base), state(out)
    assert set(M) == set(S) == set(index["weight_map"])
    for n in S:  # linear with weights 1/0 returns that model exactly (up to the output dtype)
        assert M[n].dtype == torch.bfloat16 and torch.equal(M[n], S[n].to(torch.bfloat16)), n
    assert json.loads((out / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    AutoModelForCausalLM.from_pretrained(out)


def test_dare_seed_reproduces_and_changes_masks(tiny_models, tmp_path):
    base, a, b = tiny_models("llama", 3)
    text = f"""
merge_method: dare_ties
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.5, density: 0.3}}}}
  - {{model: {b}, parameters: {{weight: 0.5, density: 0.3}}}}
"""
    m1 = state(merge(text, tmp_path / "s1", tmp_path, seed=1))
    m1b = state(merge(text, tmp_path / "s1b", tmp_path, seed=1))
    m2 = state(merge(text, tmp_path / "s2", tmp_path, seed=2))
    name = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(m1[n], m1b[n]) for n in m1)
    assert not torch.equal(m1[name], m2[name])
    changed = (m1[name] != state(base)[name]).float().mean().item()
    assert 0.3 < changed < 0.7  # about 1 - (1 - 0.3)^2 of the entries move


def test_tokenizer_source_and_chat_template(tiny_models, tmp_path):
    base, a = tiny_models("llama", 2)
    (a / "tokenizer.json").write_text((a / "tokenizer.json").read_text().replace('"w95"', '"zz95"'))
    marker = "{% for m in messages %}{{ m['content'] }}{% endfor %}MARK"
    out = merge(f"""
merge_method: linear
models:
  - {{model: {base}, parameters: {{weight: 1.0}}}}
  - {{model: {a}, parameters: {{weight: 1.0}}}}
tokenizer_source: {a}
chat_template: "{marker}"
""", tmp_path / "out", tmp_path)
    assert (out / "tokenizer.json").read_text() == (a / "tokenizer.json").read_text()
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "w5"}], tokenize=False)
    assert text == "w5MARK"
    with pytest.raises(RecipeError, match="tokenizer_source"):
        merge(f"""
merge_method: linear
models:
  - {{model: {base}, parameters: {{weight: 1.0}}}}
tokenizer_source: elsewhere
""", tmp_path / "out2", tmp_path)
    assert not (tmp_path / "out2").exists()


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_interrupted_merge_leaves_nothing(tiny_models, tmp_path):
    base, a = tiny_models("llama", 2)
    plan = plan_merge(parse_recipe(f"merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {base}}}, {{model: {a}}}]\n"
                                   "parameters: {t: 0.3}\n", "r.yml"))
    out_parent = tmp_path / "outs"
    out_parent.mkdir()

    def interrupt(done, total, name):
        if done == total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute_merge(plan, out_parent / "out", on_tensor=interrupt)
    assert list(out_parent.iterdir()) == []


@pytest.mark.parametrize("case", ["arch", "shape", "names", "missing", "pickle"])
def test_mismatched_models_are_refused_before_merging(tiny_models, tmp_path, case):
    base, a = tiny_models("llama", 2)
    other = tmp_path / "other"
    if case == "arch":
        save_tiny_model(other, "gpt2")
    elif case == "shape":
        from conftest import tiny_config
        from transformers import LlamaForCausalLM

        cfg = tiny_config("llama")
        cfg.intermediate_size = 48
        LlamaForCausalLM(cfg).save_pretrained(other)
    elif case == "names":
        save_tiny_model(other, "llama", num_layers=3)
    elif case == "pickle":
        other.mkdir()
        (other / "config.json").write_text((base / "config.json").read_text())
        torch.save({"x": torch.zeros(1)}, other / "pytorch_model.bin")
    recipe = f"""
merge_method: ties
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.5}}}}
  - {{model: {other}, parameters: {{weight: 0.5}}}}
"""
    expected = {"arch": "different architectures", "shape": "has shape", "names": "missing tensor model.layers.3",
                "missing": "not found", "pickle": "pickled"}[case]
    out = tmp_path / "out"
    with pytest.raises(WorkbenchError, match=expected) as e:
        merge(recipe, out, tmp_path)
    if case == "shape":
        assert "mlp.up_proj" in str(e.value) and "mismatches" in str(e.value)
    assert not out.exists() and leftovers(tmp_path) == []


def test_cli_merge_and_its_errors(tiny_models, tmp_path, capsys):
    base, a = tiny_models("llama", 2)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base.name}\n"
                      f"models: [{{model: {a.name}, parameters: {{weight: 0.5}}}}]\n")
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 0  # model paths relative to the recipe
    assert capsys.readouterr().out.strip().endswith("merged")
    S, A, M = state(base), state(a), state(out)
    for n in S:
        torch.testing.assert_close(M[n], S[n] + 0.5 * (A[n] - S[n]), atol=1e-6, rtol=0)
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad.yml"
    bad.write_text(recipe.read_text().replace("weight: 0.5", "wieght: 0.5"))
    assert main(["merge", str(bad), str(tmp_path / "m2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.yml:3" in err and "wieght" in err
    assert main(["merge", str(recipe), str(tmp_path / "m3"), "--shard-size", "lots"]) == 2
    if not torch.cuda.is_available():
        assert main(["merge", str(recipe), str(tmp_path / "m4"), "--device", "cuda"]) == 2
    assert not any((tmp_path / m).exists() for m in ("m2", "m3", "m4"))
