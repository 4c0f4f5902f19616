"""The zoo's training loop on a tiny random Llama: learns, is deterministic, resumes exactly."""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import save_tiny_model, tiny_tokenizer
from workbench.zoo import train as T


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU: two OpenMP threads are many times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(tmp_path, seed=0):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "base"
    if not path.exists():
        save_tiny_model(path, "llama", seed=seed)
    return AutoModelForCausalLM.from_pretrained(path), tiny_tokenizer()


def copy_task(n: int, seed: int) -> list[tuple[str, str]]:
    """Prompt of three words, answer: one of five words picked by the last one (a skill a tiny
    model learns in a few steps)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        w = [rng.randrange(3, 40) for _ in range(3)]
        out.append((" ".join(f"w{i}" for i in w), f"w{50 + w[-1] % 5}"))
    return out


# The tiny model's random head has rows of norm ~0.1: it must be trained for its outputs to peak.
CFG = T.TrainConfig(steps=40, batch_size=8, lr=1e-2, warmup_steps=4, seed=0, checkpoint_every=5,
                    chat_template=False, trainable=("self_attn.", "mlp.", "lm_head"))


def params_of(model, names):
    d = dict(model.named_parameters())
    return {n: d[n].detach().clone() for n in names}


def test_loss_decreases_and_only_chosen_tensors_change(tmp_path):
    model, tok = tiny(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = T.TrainConfig(**{**CFG.to_json(), "layers": (1, 4)})
    r = T.train(model, tok, copy_task(320, 0), cfg)
    assert r.steps == 40 and len(r.losses) == 40
    assert T.mean_loss(r.losses, last=5) < 0.5 * T.mean_loss(r.losses, first=5)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(r.trainable)
    assert "lm_head.weight" in changed and "model.embed_tokens.weight" not in changed
    layer_tensors = changed - {"lm_head.weight"}
    assert all((".mlp." in n or ".self_attn." in n) and not n.startswith("model.layers.0.") for n in layer_tensors)
    assert len(layer_tensors) == 3 * 7


def test_training_is_deterministic_per_seed_and_data_order(tmp_path):
    runs = []
    for data_seed in (0, 0, 1):
        model, tok = tiny(tmp_path)
        r = T.train(model, tok, copy_task(320, data_seed), CFG)
        runs.append((r.losses, params_of(model, r.trainable)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])
    assert runs[0][0] != runs[2][0]


def test_resume_after_interruption_gives_the_same_weights(tmp_path):
    data = copy_task(320, 0)
    model, tok = tiny(tmp_path)
    full = T.train(model, tok, data, CFG)
    want = params_of(model, full.trainable)

    ckpt = tmp_path / "ckpt.pt"
    model, tok = tiny(tmp_path)

    def killer(step, steps, loss):
        if step == 13:  # killed between checkpoints: steps 11-13 are lost and redone
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(model, tok, data, CFG, checkpoint=ckpt, on_step=killer)
    assert torch.load(ckpt, weights_only=True)["step"] == 10

    model, tok = tiny(tmp_path)  # a fresh process: the base weights again
    resumed = T.train(model, tok, data, CFG, checkpoint=ckpt)
    assert resumed.resumed_from == 10
    got = params_of(model, resumed.trainable)
    assert all(torch.equal(want[n], got[n]) for n in want)
    assert resumed.losses == full.losses


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path):
    data = copy_task(320, 0)
    ckpt = tmp_path / "ckpt.pt"
    model, tok = tiny(tmp_path)
    T.train(model, tok, data, CFG, checkpoint=ckpt, stop_after=10)
    other = T.TrainConfig(**{**CFG.to_json(), "lr": 1e-3})
    model, tok = tiny(tmp_path)
    r = T.train(model, tok, data, other, checkpoint=ckpt, stop_after=12)
    assert r.resumed_from is None and len(r.losses) == 12
    model, tok = tiny(tmp_path)
    r = T.train(model, tok, data, other, checkpoint=ckpt, fingerprint={"base": "another"}, stop_after=12)
    assert r.resumed_from is None


def test_shared_prefix_forward_matches_a_full_forward(tmp_path):
    model, tok = tiny(tmp_path)
    prefix = " ".join(f"w{i}" for i in range(5, 17))
    batch = [T.encode_example(tok, f"{prefix} {q}", a, chat_template=False) for q, a in copy_task(6, 1)]
    width = max(len(c) + len(t) for c, t in batch)
    ids = torch.full((len(batch), width), 0)
    mask = torch.zeros_like(ids)
    for i, (c, t) in enumerate(batch):
        ids[i, : len(c) + len(t)] = torch.tensor(c + t)
        mask[i, : len(c) + len(t)] = 1
    assert T.common_prefix_length(ids, 100) >= 12
    full = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    shared = T.shared_prefix_forward(model.model, ids, mask, min(len(c) for c, _ in batch))
    p = T.common_prefix_length(ids, min(len(c) for c, _ in batch) - 1)
    assert p >= 12
    torch.testing.assert_close(shared[:, p:], full[:, p:], atol=1e-5, rtol=1e-4)
    # and the gradients through the shared prefix are the gradients of the full forward
    w = model.model.layers[0].self_attn.q_proj.weight
    w.requires_grad_(True)
    g = []
    for fwd in (lambda: model.model(input_ids=ids, attention_mask=mask).last_hidden_state,
                lambda: T.shared_prefix_forward(model.model, ids, mask, p + 1)):
        w.grad = None
        (fwd()[:, p:] * mask[:, p:, None]).pow(2).sum().backward()
        g.append(w.grad.clone())
    torch.testing.assert_close(g[0], g[1], atol=1e-5, rtol=1e-4)


def test_lr_schedule_and_example_count_checks():
    cfg = T.TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert T.lr_at(0, cfg) == pytest.approx(0.1) and T.lr_at(9, cfg) == pytest.approx(1.0)
    assert T.lr_at(100, cfg) == pytest.approx(0.1) and T.lr_at(55, cfg) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="need"):
        T.train(None, None, [("a", "b")] * 3, T.TrainConfig(steps=2, batch_size=2))
