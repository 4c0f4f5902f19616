"""DARE/DELLA masks: drawn on the CPU from (shape, probabilities, seed), so the same on every device,
exact Bernoulli draws, and a seeded merge that repeats itself.

Without a GPU the other device is torch's ``meta`` device (shapes only): the code path a non-CPU
tensor takes is run there, and the CPU bits it draws are compared with those drawn for a CPU tensor.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from workbench.merge import executor
from workbench.merge.methods import get_method
from workbench.merge.methods import sparsify
from workbench.merge.methods.base import MergeParams
from workbench.merge.plan import TensorJob


def record(monkeypatch, name: str) -> list[torch.Tensor]:
    """Wraps ``sparsify.<name>`` so that every tensor it returns is kept (a copy) in the list returned."""
    seen: list[torch.Tensor] = []
    real = getattr(sparsify, name)

    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.clone())
        return out

    monkeypatch.setattr(sparsify, name, wrapper)
    return seen


@pytest.mark.parametrize("fn,params", [(sparsify.draw_bernoulli, ["shape", "density", "seed"]),
                                       (sparsify.draw_della, ["shape", "density", "epsilon", "seed"])])
def test_the_draws_never_see_a_device(fn, params):
    assert list(inspect.signature(fn).parameters) == params  # no tensor, no device: nothing to read one from
    out = fn((3, 70), 0.4, 0.2, 5) if "epsilon" in params else fn((3, 70), 0.4, 5)
    assert out.device.type == "cpu" and out.dtype == torch.bool and out.shape == (3, 70)


def test_dare_mask_of_a_non_cpu_tensor_draws_the_cpu_bits(monkeypatch):
    x = torch.randn(37, 53)
    cpu = sparsify.bernoulli_mask(x, 0.3, torch.Generator().manual_seed(9))
    seen = record(monkeypatch, "draw_bernoulli")
    other = sparsify.bernoulli_mask(x.to("meta"), 0.3, torch.Generator().manual_seed(9))
    assert other.device.type == "meta" and other.shape == x.shape and other.dtype == torch.bool
    assert len(seen) == 1 and torch.equal(seen[0], cpu)  # what was copied to the device


@pytest.mark.parametrize("shape", [(40, 17), (300,), (6, 5, 4)])
def test_della_mask_of_a_non_cpu_tensor_draws_the_cpu_bits(monkeypatch, shape):
    mags = torch.randn(shape).abs()
    seen = record(monkeypatch, "draw_della")
    cpu = sparsify.della_mask(mags, 0.4, 0.2, torch.Generator().manual_seed(3))
    other = sparsify.della_mask(mags.to("meta"), 0.4, 0.2, torch.Generator().manual_seed(3))
    assert other.device.type == "meta" and other.shape == mags.shape and other.dtype == torch.bool
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    # the rest is a stable sort on the device: the mask is the rank-ordered draws put back in place
    rows = mags.reshape(1, -1) if mags.dim() < 2 else mags
    order = np.argsort(rows.numpy(), axis=1, kind="stable")
    ref = np.empty(rows.shape, dtype=bool)
    np.put_along_axis(ref, order, seen[0].numpy(), axis=1)
    assert np.array_equal(cpu.numpy(), ref.reshape(shape))


def test_della_ties_are_ranked_by_position():
    """Ties (common: zeros in a delta) must be ranked the same on every device: by position."""
    mags = torch.tensor([[0.0, 0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 0.0] * 30])
    mask = sparsify.della_mask(mags, 0.5, 0.4, torch.Generator().manual_seed(1))
    draws = sparsify.draw_della((1, 300), 0.5, 0.4, sparsify.mask_seed(torch.Generator().manual_seed(1)))
    ranks = np.argsort(np.argsort(mags.numpy(), axis=1, kind="stable"), axis=1, kind="stable")
    assert np.array_equal(mask.numpy(), np.take_along_axis(draws.numpy(), ranks, axis=1))


@pytest.mark.parametrize("density", [0.05, 0.3, 0.9])
def test_dare_bits_are_bernoulli_density(density):
    n = 1 << 21
    mask = sparsify.draw_bernoulli((n,), density, 123).numpy()
    sigma = (density * (1 - density) / n) ** 0.5
    assert abs(mask.mean() - density) < 5 * sigma
    # neighbours (the two 32-bit halves of one PCG64 output) are independent: P(both) = density**2
    pairs = mask[0::2] & mask[1::2]
    assert abs(pairs.mean() - density**2) < 5 * (density**2 * (1 - density**2) / (n // 2)) ** 0.5
    # the rule itself, from numpy directly: 32-bit draws below round(density * 2**32)
    raw = np.random.PCG64(123).random_raw(n // 2).view(np.uint32)
    assert np.array_equal(mask, raw < round(density * 2**32))  # (chunks of even length: one stream)


def test_della_bits_follow_the_rank_probabilities():
    rows, n, density, eps = 40_000, 6, 0.5, 0.3
    kept = sparsify.draw_della((rows, n), density, eps, 77).numpy()
    p = sparsify.della_probabilities(n, density, eps)
    np.testing.assert_allclose(p, density - eps + 2 * eps * np.arange(n) / (n - 1))
    sigma = np.sqrt(p * (1 - p) / rows)
    assert np.all(np.abs(kept.mean(axis=0) - p) < 5 * sigma)
    single = sparsify.draw_della((50_000, 1), density, eps, 78).numpy()  # one entry: no spread
    assert abs(single.mean() - density) < 5 * (0.25 / 50_000) ** 0.5


def job_for(method: str, shape: tuple[int, ...]) -> tuple[object, TensorJob]:
    per = [{"weight": 1.0, "density": 0.5, **({"epsilon": 0.2} if method.startswith("della") else {})},
           {"weight": 0.6, "density": 0.4, **({"epsilon": 0.1} if method.startswith("della") else {})}]
    m = get_method(method)
    shared = {k: v.default for k, v in m.shared_params().items()}
    plan = type("Plan", (), {"method": m})()  # merge_tensor reads only plan.method
    return plan, TensorJob("model.layers.0.mlp.up_proj.weight", shape, (0, "w"), [(1, "w"), (2, "w")],
                           MergeParams(shared, per))


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_seeded_merge_repeats_differs_across_seeds_and_ignores_the_device(method):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(24, 40, generator=g)
    inputs = (base, [base + 0.1 * torch.randn(24, 40, generator=g) for _ in range(2)])
    plan, job = job_for(method, (24, 40))

    def run(seed, device="cpu"):
        torch.manual_seed(seed + 1000)  # the global RNG must not matter
        return executor.merge_tensor(plan, job, inputs, torch.device(device), seed)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a != base, c != base)
    # the device argument no longer picks the generator (a CUDA generator failed here, without CUDA)
    for device in ("meta", "cuda"):
        assert torch.equal(run(7, device), a)
