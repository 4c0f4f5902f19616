"""LoRA adapters as merge inputs (mergekit's ``BASE+ADAPTER``), LoRA extraction
(`workbench extract-lora`) and `workbench merge --as-lora`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import save_tiny_model, tiny_tokenizer
from workbench.cli import main
from workbench.merge.executor import execute_merge
from workbench.merge.plan import plan_merge
from workbench.merge.recipe import dump_recipe, load_recipe, parse_recipe

peft = pytest.importorskip("peft")


def weights(d: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(d).glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def make_adapter(base: Path, out: Path, seed: int = 0, r: int = 4, alpha: int = 8, **kwargs) -> Path:
    """A peft LoRA adapter over ``base`` with random (non-zero) A and B, saved as safetensors."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    targets = kwargs.pop("target_modules", ["q_proj", "v_proj", "o_proj", "down_proj"])
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, **kwargs)
    pm = peft.get_peft_model(model, cfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(out)
    assert (out / "adapter_model.safetensors").is_file()
    return out


def merged_copy(base: Path, adapter: Path, out: Path) -> Path:
    """``base`` with ``adapter`` merged in by peft (what mergekit does with BASE+ADAPTER)."""
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    tiny_tokenizer().save_pretrained(out)
    return out


def ta_recipe(base: str, a: str, b: str) -> str:
    return (f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
            f"  - model: {a}\n    parameters: {{weight: 0.7}}\n"
            f"  - model: {b}\n    parameters: {{weight: 0.4}}\ndtype: float32\n")


def merge_text(tmp_path: Path, text: str, name: str) -> dict[str, torch.Tensor]:
    path = tmp_path / f"{name}.yml"
    path.write_text(text)
    plan = plan_merge(load_recipe(path))
    try:
        execute_merge(plan, tmp_path / name)
    finally:
        plan.close()
    return weights(tmp_path / name)


@pytest.fixture
def lora_setup(tiny_models, tmp_path):
    base, v1, v2 = tiny_models("llama", 3)
    adapter = make_adapter(v1, tmp_path / "adapter", rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
    return base, v1, v2, adapter, merged_copy(v1, adapter, tmp_path / "v1-merged")


# --- BASE+ADAPTER as a merge input ------------------------------------------------------------

def test_lora_reference_equals_merging_the_adapter_first(lora_setup, tmp_path):
    base, v1, v2, adapter, merged = lora_setup
    got = merge_text(tmp_path, ta_recipe(str(base), f"{v1}+{adapter}", str(v2)), "with-lora")
    want = merge_text(tmp_path, ta_recipe(str(base), str(merged), str(v2)), "with-copy")
    plain = merge_text(tmp_path, ta_recipe(str(base), str(v1), str(v2)), "without")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)
    changed = [n for n in want if not torch.equal(plain[n], want[n])]
    assert any("q_proj" in n for n in changed) and any("down_proj" in n for n in changed)
    # the merged model's recipe names both parts by absolute path, as mergekit reads it
    written = yaml.safe_load((tmp_path / "with-lora" / "mergekit_config.yml").read_text())
    assert written["models"][0]["model"] == f"{v1.absolute()}+{adapter.absolute()}"


def test_lora_reference_as_base_model_and_in_slices(lora_setup, tmp_path):
    base, v1, v2, adapter, merged = lora_setup
    text = ("merge_method: passthrough\nslices:\n  - sources: [{model: %s, layer_range: [0, 2]}]\n"
            "  - sources: [{model: %s, layer_range: [2, 4]}]\ndtype: float32\n")
    got = merge_text(tmp_path, text % (f"{v1}+{adapter}", v2), "sliced-lora")
    want = merge_text(tmp_path, text % (merged, v2), "sliced-copy")
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)


def test_in_memory_search_merger_applies_the_adapter(lora_setup, tmp_path):
    from workbench.search.candidates import InMemoryMerger

    base, v1, v2, adapter, merged = lora_setup
    with_lora = parse_recipe(ta_recipe(str(base), f"{v1}+{adapter}", str(v2)))
    with_copy = parse_recipe(ta_recipe(str(base), str(merged), str(v2)))
    a, b = InMemoryMerger(with_lora), InMemoryMerger(with_copy)
    a.apply(with_lora)
    b.apply(with_copy)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for name in sb:
        torch.testing.assert_close(sa[name], sb[name], atol=1e-6, rtol=0)
    # the source is held by both parts' names (v1 alone would be another source)
    ids = {model for model, _ in a._sources}
    assert f"{v1.absolute()}+{adapter.absolute()}" in ids and str(v1.absolute()) not in ids


def test_gpt2_conv1d_adapter_fan_in_fan_out(tiny_models, tmp_path):
    base, v1, v2 = tiny_models("gpt2", 3)
    adapter = make_adapter(v1, tmp_path / "ad", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    merged = merged_copy(v1, adapter, tmp_path / "merged")
    got = merge_text(tmp_path, ta_recipe(str(base), f"{v1}+{adapter}", str(v2)), "g-lora")
    want = merge_text(tmp_path, ta_recipe(str(base), str(merged), str(v2)), "g-copy")
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)


def test_lora_recipe_round_trips_through_the_dumper(lora_setup, tmp_path):
    base, v1, v2, adapter, _ = lora_setup
    text = ta_recipe("base", "v1+adapter", "v2")
    r = parse_recipe(text)
    assert r.models[0].model == "v1+adapter" and r.is_lora_ref("v1+adapter")
    dumped = dump_recipe(r)
    assert "model: v1+adapter" in dumped
    assert parse_recipe(dumped).to_dict() == r.to_dict()
    # mergekit's explicit form of a LoRA reference reads as the same reference
    explicit = text.replace("model: v1+adapter", "model: {model: {path: v1}, lora: {path: adapter}}")
    assert parse_recipe(explicit).models[0].model == "v1+adapter"
    # validate --mergekit-paths: both parts by absolute path (relative to the recipe here)
    for name, src in (("base", base), ("v1", v1), ("v2", v2), ("adapter", adapter)):
        if not (tmp_path / name).exists():
            (tmp_path / name).symlink_to(src)
    recipe = tmp_path / "r.yml"
    recipe.write_text(text)
    out = tmp_path / "for-mergekit.yml"
    assert main(["recipe", "validate", str(recipe), "--mergekit-paths", str(out)]) == 0
    written = out.read_text()
    assert f"model: {(tmp_path / 'v1').absolute()}+{(tmp_path / 'adapter').absolute()}" in written
    assert yaml.safe_load(written)["models"][0]["model"] == f"{tmp_path / 'v1'}+{tmp_path / 'adapter'}"


def test_literal_path_with_plus_stays_a_path(tiny_models, tmp_path):
    base, v1, v2 = tiny_models("llama", 3)
    odd = tmp_path / "v1+copy"
    odd.symlink_to(v1)
    text = ta_recipe(str(base), "{model: {path: %s}}" % odd, str(v2))
    r = parse_recipe(text)
    assert not r.is_lora_ref(str(odd))
    assert "{model: {path: %s}}" % odd in dump_recipe(r.resolved())
    plan = plan_merge(r)
    plan.close()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


def run_bad(tmp_path, base, v1, v2, adapter, capsys) -> int:
    recipe = tmp_path / "bad.yml"
    recipe.write_text(ta_recipe(str(base), f"{v1}+{adapter}", str(v2)))
    capsys.readouterr()
    return main(["merge", str(recipe), str(tmp_path / "out-bad"), "--no-progress"])


def test_adapter_of_another_shape_is_refused(lora_setup, tmp_path, capsys):
    base, v1, v2, adapter, _ = lora_setup
    bad = tmp_path / "bad-adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    t = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    t[key] = torch.randn(4, 48)
    save_file(t, bad / "adapter_model.safetensors")
    assert run_bad(tmp_path, base, v1, v2, bad, capsys) == 2
    err = one_error_line(capsys)
    assert key in err and "[48, 4]" not in err and "[32, 48]" in err and "[32, 32]" in err
    assert not (tmp_path / "out-bad").exists()


def test_adapter_for_another_model_is_refused(lora_setup, tmp_path, capsys):
    base, v1, v2, adapter, _ = lora_setup
    other = save_tiny_model(tmp_path / "gpt2", "gpt2")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(other)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert run_bad(tmp_path, base, v1, v2, adapter, capsys) == 2
    err = one_error_line(capsys)
    assert "base_model_name_or_path" in err and "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err


def test_pickled_adapter_is_refused(lora_setup, tmp_path, capsys):
    base, v1, v2, adapter, _ = lora_setup
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    assert run_bad(tmp_path, base, v1, v2, adapter, capsys) == 2
    err = one_error_line(capsys)
    assert "adapter_model.bin" in err and "pickled" in err and "models.0.model" in err


def test_missing_adapter_config_is_refused(lora_setup, tmp_path, capsys):
    base, v1, v2, adapter, _ = lora_setup
    (adapter / "adapter_config.json").unlink()
    assert run_bad(tmp_path, base, v1, v2, adapter, capsys) == 2
    assert "adapter_config.json" in one_error_line(capsys)


def test_missing_adapter_directory_is_named(lora_setup, tmp_path, capsys):
    base, v1, v2, _, _ = lora_setup
    assert run_bad(tmp_path, base, v1, v2, tmp_path / "nowhere", capsys) == 2
    err = one_error_line(capsys)
    assert "LoRA adapter" in err and "nowhere" in err


# --- extraction -------------------------------------------------------------------------------

def linear_names(d: Path) -> list[str]:
    return sorted(n[:-len(".weight")] for n in weights(d) if n.endswith("_proj.weight") or "c_attn" in n
                  or "c_fc" in n or ("c_proj" in n and n.endswith(".weight")))


def test_extract_full_rank_reproduces_the_delta(tiny_models, tmp_path):
    from workbench.ops.lora import extract_lora

    base, ft = tiny_models("llama", 2)
    events = []
    result = extract_lora(base, ft, 64, tmp_path / "ad", progress=events.append)
    wb, wf, ad = weights(base), weights(ft), load_file(tmp_path / "ad" / "adapter_model.safetensors")
    names = linear_names(base)
    assert sorted(lay.name for lay in result.layers) == names
    assert max(lay.rel_error for lay in result.layers) < 1e-5 and result.rel_error < 1e-5
    for n in names:
        ba = ad[f"base_model.model.{n}.lora_B.weight"] @ ad[f"base_model.model.{n}.lora_A.weight"]
        torch.testing.assert_close(ba, wf[f"{n}.weight"] - wb[f"{n}.weight"], atol=1e-5, rtol=0)
    # mergekit: embeddings, head and norms at full rank, the finetuned's weights
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert {"model.embed_tokens", "lm_head", "model.norm"} <= set(cfg["modules_to_save"])
    torch.testing.assert_close(ad["base_model.model.model.embed_tokens.weight"], wf["model.embed_tokens.weight"])
    assert cfg["r"] == 32 and cfg["lora_alpha"] == 32 and cfg["rank_pattern"] == cfg["alpha_pattern"]
    assert events[-1].done == events[-1].total and events[0].stage == "extract"


def test_extract_low_rank_error_is_the_tail_singular_values(tiny_models, tmp_path):
    from workbench.ops.lora import extract_lora

    base, ft = tiny_models("llama", 2)
    result = extract_lora(base, ft, 3, tmp_path / "ad")
    wb, wf = weights(base), weights(ft)
    sq_tail = sq_all = 0.0
    for lay in result.layers:
        delta = (wf[f"{lay.name}.weight"] - wb[f"{lay.name}.weight"]).double().numpy()
        s = np.linalg.svd(delta, compute_uv=False)
        want = np.sqrt((s[3:] ** 2).sum() / (s ** 2).sum())
        assert lay.rank == 3
        assert lay.rel_error == pytest.approx(want, rel=1e-4)
        sq_tail, sq_all = sq_tail + (s[3:] ** 2).sum(), sq_all + (s ** 2).sum()
    assert result.rel_error == pytest.approx(np.sqrt(sq_tail / sq_all), rel=1e-4)
    # A = sqrt(S) V^T and B = U sqrt(S): the singular values split evenly (mergekit's default)
    ad = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    n = result.layers[0].name
    a, b = ad[f"base_model.model.{n}.lora_A.weight"], ad[f"base_model.model.{n}.lora_B.weight"]
    torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_extracted_adapter_loads_in_peft(tiny_models, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from workbench.ops.lora import extract_lora

    base, ft = tiny_models(arch, 2)
    result = extract_lora(base, ft, 2, tmp_path / "ad")
    ad = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "ad").eval()
    # what the adapter should make: base + B A per layer, the full-rank modules the finetuned's
    want = AutoModelForCausalLM.from_pretrained(base).eval()
    wf = weights(ft)
    with torch.no_grad():
        params = dict(want.named_parameters())
        for lay in result.layers:
            delta = ad[f"base_model.model.{lay.name}.lora_B.weight"] @ ad[f"base_model.model.{lay.name}.lora_A.weight"]
            params[f"{lay.name}.weight"] += delta.T if arch == "gpt2" else delta
            if f"base_model.model.{lay.name}.lora_B.bias" in ad:
                params[f"{lay.name}.bias"] += ad[f"base_model.model.{lay.name}.lora_B.bias"]
        for mod in cfg["modules_to_save"]:
            for t in (f"{mod}.weight", f"{mod}.bias"):
                if t in wf:
                    params[t].copy_(wf[t])
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want(ids).logits, atol=1e-5, rtol=1e-5)
    if arch == "gpt2":   # Conv1D layers, all with biases: fan_in_fan_out and lora_bias
        assert cfg["fan_in_fan_out"] and cfg["lora_bias"] and not result.dropped_biases
    if arch == "qwen2":  # biases on q/k/v only: peft cannot hold them
        assert not cfg["lora_bias"] and any("q_proj.bias" in n for n in result.dropped_biases)


def test_extract_lora_cli_prints_the_table_and_refuses_bad_input(tiny_models, tmp_path, capsys):
    base, ft = tiny_models("llama", 2)
    out = tmp_path / "ad"
    assert main(["extract-lora", str(base), str(ft), "--rank", "4", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.q_proj" in err and "overall" in err and "rel. error" in err
    assert main(["extract-lora", str(base), str(ft), "--rank", "4", "--out", str(out), "--no-progress"]) == 2
    assert "already exists" in one_error_line(capsys)
    other = save_tiny_model(tmp_path / "gpt2", "gpt2")
    capsys.readouterr()
    assert main(["extract-lora", str(base), str(other), "--rank", "4", "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2
    assert "GPT2LMHeadModel" in one_error_line(capsys)
    assert main(["extract-lora", str(base), str(ft), "--rank", "0", "--out", str(tmp_path / "y"),
                 "--no-progress"]) == 2
    assert "--rank" in one_error_line(capsys)


def test_extract_from_a_lora_reference_recovers_the_adapter_update(lora_setup, tmp_path):
    from workbench.ops.lora import extract_lora

    base, v1, v2, adapter, merged = lora_setup
    result = extract_lora(v1, f"{v1}+{adapter}", 4, tmp_path / "re", skip_undecomposable=True)
    assert result.rel_error < 1e-5 and not result.skipped == []
    adapted = {lay.name for lay in result.layers if lay.delta_norm > 0}
    assert adapted == {n[len("base_model.model."):-len(".lora_A.weight")]
                       for n in load_file(adapter / "adapter_model.safetensors") if n.endswith("lora_A.weight")}


# --- merge --as-lora --------------------------------------------------------------------------

def test_merge_as_lora_round_trip(tiny_models, tmp_path, capsys):
    base, ft = tiny_models("llama", 2)
    recipe = tmp_path / "linear.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.0}}\n"
                      f"  - model: {ft}\n    parameters: {{weight: 1.0}}\ndtype: float32\n")
    out = tmp_path / "as-lora"
    assert main(["merge", str(recipe), str(out), "--as-lora", str(base), "--rank", "64", "--no-progress"]) == 0
    assert "overall" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # the merge is gone
    ad, wb, wf = load_file(out / "adapter_model.safetensors"), weights(base), weights(ft)
    for n in linear_names(base):
        ba = ad[f"base_model.model.{n}.lora_B.weight"] @ ad[f"base_model.model.{n}.lora_A.weight"]
        torch.testing.assert_close(ba, wf[f"{n}.weight"] - wb[f"{n}.weight"], atol=1e-5, rtol=0)
    assert main(["merge", str(recipe), str(tmp_path / "o2"), "--rank", "4", "--no-progress"]) == 2
    assert "--as-lora" in one_error_line(capsys)


def test_search_spec_names_a_lora_model(lora_setup, tmp_path):
    from workbench.search.genome import GenomeLayout
    from workbench.search.run import resolve_models
    from workbench.search.spec import spec_from_dict

    base, v1, v2, adapter, merged = lora_setup
    spec = spec_from_dict({"models": [f"{v1}+{adapter}", str(v2)], "base_model": str(base),
                           "merge_method": "task_arithmetic", "evolve": {"weight": [0.0, 1.0]},
                           "objective": ["synthetic"]})
    spec = resolve_models(spec)
    assert spec.models[0] == f"{v1.absolute()}+{adapter.absolute()}"
    layout = GenomeLayout(spec, num_layers=4)
    recipe = layout.to_recipe(layout.start())
    plan = plan_merge(recipe)
    try:
        assert type(plan.models[recipe.referenced_models().index(spec.models[0])]).__name__ == "LoraModelDir"
    finally:
        plan.close()
