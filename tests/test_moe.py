"""`workbench moe`: mixture-of-experts models from tiny dense ones, as mergekit-moe builds them.

The gate vectors are checked against mergekit 0.1.5's rule written out plainly here (its
``get_gate_params``: hidden states entering each layer at the prompts' last position, averaged
over the prompts, positive minus negative, L2-normalised; or the prompts' summed token embeddings).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import save_tiny_model, tiny_config, tiny_tokenizer
from workbench.cli import main
from workbench.errors import WorkbenchError

POS = [["w3 w4 w5", "w10 w11"], ["w60 w61", "w70 w71 w72 w73 w74"], ["w20 w21 w22"]]
NEG = [["w50 w51 w52 w53"], None, ["w7"]]


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """A tiny Llama base and two variants of it (the same shapes)."""
    d = tmp_path_factory.mktemp("llamas")
    base = save_tiny_model(d / "base", "llama", seed=0)
    return [base] + [save_tiny_model(d / f"v{i}", "llama", seed=i, base=base, delta_scale=0.05) for i in (1, 2)]


def write_config(path: Path, base, experts, gate_mode="hidden", prompts=True, extra="", k=2, shared=None) -> Path:
    lines = [f"base_model: {base}", f"gate_mode: {gate_mode}", "dtype: float32", f"experts_per_token: {k}",
             "experts:"]
    for i, e in enumerate(experts):
        lines.append(f"  - source_model: {e}")
        if prompts:
            lines.append(f"    positive_prompts: {json.dumps(POS[i])}")
            if NEG[i]:
                lines.append(f"    negative_prompts: {json.dumps(NEG[i])}")
    if shared is not None:
        lines += ["shared_experts:", f"  - source_model: {shared}", '    positive_prompts: ["w30 w31"]']
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def tensors(d: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def load(d: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d).eval()


def mergekit_tokenize(tok, prompts):
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    return tok([tok.bos_token + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)


def mergekit_hidden_gates(base: Path, experts: int) -> torch.Tensor:
    """(layers, experts, hidden), mergekit's rule: the base in bfloat16; per prompt the hidden state
    entering each layer at the last (left-padded) position; the mean over prompts; minus the
    negative prompts' mean; divided by its L2 norm."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(base)

    def vec(prompts):
        batch = mergekit_tokenize(tok, prompts)
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True)
        per_layer = [h[:, -1, :] for h in out.hidden_states[:-1]]          # each (prompts, hidden)
        return torch.stack([h.sum(dim=0) / h.shape[0] for h in per_layer])  # (layers, hidden)

    gates = []
    for i in range(experts):
        v = vec(POS[i])
        if NEG[i]:
            v = v - vec(NEG[i])
        gates.append(v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(gates, dim=1).float()


def test_mixtral_from_llamas_loads_generates_and_has_expert_tensors(llamas, tmp_path):
    from workbench.ops.moe import moe

    cfg = write_config(tmp_path / "moe.yml", llamas[0], llamas)
    events = []
    result = moe(cfg, tmp_path / "out", progress=events.append)
    out = tmp_path / "out"
    assert result.architecture == "MixtralForCausalLM" and result.num_experts == 3 and result.seed is None
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] == 3 and config["num_experts_per_tok"] == 2
    for f in ("tokenizer.json", "README.md", "mergekit_moe_config.yml", "generation_config.json"):
        assert (out / f).is_file(), f
    assert str(llamas[1]) in (out / "mergekit_moe_config.yml").read_text()   # models by absolute path

    t = tensors(out)
    assert len(t) == result.num_tensors
    srcs = [tensors(p) for p in llamas]
    for layer in range(4):
        prefix = f"model.layers.{layer}.block_sparse_moe"
        assert t[f"{prefix}.gate.weight"].shape == (3, 32)
        for e in range(3):
            for dense, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                assert torch.equal(t[f"{prefix}.experts.{e}.{w}.weight"],
                                   srcs[e][f"model.layers.{layer}.mlp.{dense}.weight"])
        assert torch.equal(t[f"model.layers.{layer}.self_attn.q_proj.weight"],
                           srcs[0][f"model.layers.{layer}.self_attn.q_proj.weight"])
    assert not any(".mlp." in k for k in t)
    assert torch.equal(t["lm_head.weight"], srcs[0]["lm_head.weight"])

    model = load(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2
    ids = torch.tensor([[1, 5, 9, 30, 44]])
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 9)

    stages = {e.stage for e in events}
    assert stages == {"gate prompts", "moe"}
    prompts = [e for e in events if e.stage == "gate prompts"]
    assert prompts[-1].done == prompts[-1].total == sum(map(len, POS)) + sum(len(n or ()) for n in NEG)
    written = [e for e in events if e.stage == "moe"]
    assert [e.done for e in written] == list(range(1, result.num_tensors + 1))


def test_random_gates_with_identical_experts_equal_the_dense_model(llamas, tmp_path):
    from workbench.ops.moe import moe

    cfg = write_config(tmp_path / "moe.yml", llamas[1], [llamas[1]] * 3, gate_mode="random", prompts=False)
    result = moe(cfg, tmp_path / "out", seed=11)
    assert result.seed == 11
    assert "seed 11" in (tmp_path / "out" / "mergekit_moe_config.yml").read_text()
    assert "seed 11" in (tmp_path / "out" / "README.md").read_text()
    gates = tensors(tmp_path / "out")["model.layers.0.block_sparse_moe.gate.weight"]
    assert torch.equal(gates, torch.randn((4, 3, 32), generator=torch.Generator().manual_seed(11))[0])

    ids = torch.tensor([[1, 5, 9, 30, 44, 60, 70, 3], [1, 80, 81, 82, 83, 84, 85, 86]])
    with torch.no_grad():
        dense = load(llamas[1])(ids).logits
        moe_logits = load(tmp_path / "out")(ids).logits
    assert torch.allclose(moe_logits, dense, atol=1e-5, rtol=0)

    moe(cfg, tmp_path / "out2", seed=12)
    assert not torch.equal(tensors(tmp_path / "out2")["model.layers.0.block_sparse_moe.gate.weight"], gates)


def test_hidden_gates_are_mergekits_rule(llamas, tmp_path):
    from workbench.ops.moe import moe

    cfg = write_config(tmp_path / "moe.yml", llamas[0], llamas[1:], gate_mode="hidden")
    moe(cfg, tmp_path / "out")
    t = tensors(tmp_path / "out")
    got = torch.stack([t[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(4)])
    want = mergekit_hidden_gates(llamas[0], 2)
    assert got.shape == want.shape == (4, 2, 32)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert torch.allclose(got.norm(dim=-1), torch.ones(4, 2), atol=1e-2)   # unit rows (bfloat16 norms)


def test_cheap_embed_gates_are_mergekits_rule(llamas, tmp_path):
    from transformers import AutoTokenizer

    from workbench.ops.moe import moe

    cfg = write_config(tmp_path / "moe.yml", llamas[0], llamas[1:], gate_mode="cheap_embed")
    moe(cfg, tmp_path / "out")
    t = tensors(tmp_path / "out")
    embed = tensors(llamas[0])["model.embed_tokens.weight"]
    tok = AutoTokenizer.from_pretrained(llamas[0])

    def vec(prompts):   # one-hot rows times the embedding matrix, padding masked, summed, normalised
        batch = mergekit_tokenize(tok, prompts)
        onehot = torch.nn.functional.one_hot(batch["input_ids"], num_classes=embed.shape[0]).float()
        h = ((onehot @ embed.float()) * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0)
        return h / h.norm().clamp(min=1e-8)

    for e in range(2):
        v = vec(POS[e]) - vec(NEG[e]) if NEG[e] else vec(POS[e])
        v = v / v.norm().clamp(min=1e-8)
        for layer in range(4):   # the same vector for every layer
            assert torch.allclose(t[f"model.layers.{layer}.block_sparse_moe.gate.weight"][e], v, atol=1e-6)


def test_qwen2_sources_give_a_qwen2_moe_model(tmp_path):
    from workbench.ops.moe import moe

    base = save_tiny_model(tmp_path / "qbase", "qwen2", seed=0)
    experts = [save_tiny_model(tmp_path / f"q{i}", "qwen2", seed=i, base=base, delta_scale=0.05) for i in (1, 2)]
    cfg = write_config(tmp_path / "moe.yml", base, experts, shared=base)
    result = moe(cfg, tmp_path / "out")
    assert result.architecture == "Qwen2MoeForCausalLM"
    t = tensors(tmp_path / "out")
    src = tensors(experts[1])
    assert torch.equal(t["model.layers.2.mlp.experts.1.up_proj.weight"], src["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(t["model.layers.2.mlp.shared_expert.down_proj.weight"],
                       tensors(base)["model.layers.2.mlp.down_proj.weight"])
    assert t["model.layers.0.mlp.gate.weight"].shape == (2, 32)
    assert t["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 32)
    assert torch.equal(t["model.layers.0.self_attn.q_proj.bias"], tensors(base)["model.layers.0.self_attn.q_proj.bias"])

    model = load(tmp_path / "out")
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.num_experts == 2
    ids = torch.tensor([[1, 5, 9, 30]])
    assert torch.isfinite(model(ids).logits).all()
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)

    no_shared = write_config(tmp_path / "plain.yml", base, experts)   # mergekit's Mixtral takes no Qwen2
    with pytest.raises(WorkbenchError, match="Qwen MoE needs exactly one shared expert"):
        moe(no_shared, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def cli_error(capsys, argv) -> str:
    capsys.readouterr()   # what the test itself printed (transformers' save bars)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    return err


def test_bad_inputs_are_one_line_cli_errors(llamas, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "noprompts.yml", llamas[0], llamas[1:], prompts=False)
    err = cli_error(capsys, ["moe", str(cfg), str(out), "--no-progress"])
    assert f"{cfg}:6: experts.0: gate_mode hidden needs positive_prompts" in err

    cfg = write_config(tmp_path / "unknown.yml", llamas[0], llamas[1:], extra="expert_per_token: 2\n")
    err = cli_error(capsys, ["moe", str(cfg), str(out), "--no-progress"])
    assert f"{cfg}:11: expert_per_token: unknown key" in err

    cfg = write_config(tmp_path / "missing.yml", llamas[0], [llamas[1], tmp_path / "nope"])
    err = cli_error(capsys, ["moe", str(cfg), str(out), "--no-progress"])
    assert f"{cfg}:9: experts.1.source_model:" in err and "no such model" in err

    wide_cfg = tiny_config("llama")
    wide_cfg.intermediate_size = 48
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(wide_cfg).save_pretrained(tmp_path / "wide")
    tiny_tokenizer().save_pretrained(tmp_path / "wide")
    cfg = write_config(tmp_path / "shapes.yml", llamas[0], [llamas[1], tmp_path / "wide"])
    err = cli_error(capsys, ["moe", str(cfg), str(out), "--no-progress"])
    assert f"{cfg}:9: experts.1.source_model:" in err and "has shape [48, 32], the base model's is [64, 32]" in err

    short = save_tiny_model(tmp_path / "short", "llama", seed=4, num_layers=2)
    cfg = write_config(tmp_path / "layers.yml", llamas[0], [llamas[1], short])
    assert "2 layers, the base model has 4" in cli_error(capsys, ["moe", str(cfg), str(out), "--no-progress"])

    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = shutil.copytree(llamas[2], tmp_path / "other-tok")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 96)}}
    vocab["w3"], vocab["w4"] = 4, 3
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(other)
    cfg = write_config(tmp_path / "tok.yml", llamas[0], [llamas[1], other])
    err = cli_error(capsys, ["moe", str(cfg), str(out), "--no-progress"])
    assert f"{cfg}:9: experts.1.source_model:" in err and "vocabulary differs from the base model's" in err

    cfg = write_config(tmp_path / "same.yml", llamas[0], [llamas[1], llamas[1]])
    assert "--i-understand-this-is-not-useful-without-training" in cli_error(
        capsys, ["moe", str(cfg), str(out), "--no-progress"])

    cfg = write_config(tmp_path / "k.yml", llamas[0], llamas[1:], k=3)
    assert f"{cfg}:4: experts_per_token: 3 experts per token (the default is 2), but only 2 experts" in cli_error(
        capsys, ["moe", str(cfg), str(out), "--no-progress"])

    assert "no such config file" in cli_error(capsys, ["moe", str(tmp_path / "none.yml"), str(out)])
    assert not out.exists()


def test_output_appears_only_when_complete(llamas, tmp_path, monkeypatch, capsys):
    import workbench.merge.moe as moe_mod

    cfg = write_config(tmp_path / "moe.yml", llamas[0], llamas[1:], gate_mode="random", prompts=False)
    real = moe_mod.job_tensor
    calls = []

    def failing(plan, job, gates, seed):
        calls.append(job.name)
        if len(calls) == 20:
            raise WorkbenchError(f"{job.name}: read failed (injected)")
        return real(plan, job, gates, seed)

    monkeypatch.setattr(moe_mod, "job_tensor", failing)
    out = tmp_path / "out"
    assert "read failed (injected)" in cli_error(capsys, ["moe", str(cfg), str(out), "--no-progress"])
    assert len(calls) == 20
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe.yml"]   # no temporary left beside it

    monkeypatch.setattr(moe_mod, "job_tensor", real)
    assert main(["moe", str(cfg), str(out), "--no-progress"]) == 0
    assert (out / "model.safetensors").is_file()
    assert "already exists" in cli_error(capsys, ["moe", str(cfg), str(out), "--no-progress"])
