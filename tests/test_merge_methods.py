"""Merge methods: each is checked against a plain reference written here (numpy, per-element
loops or the paper's formula) and against the properties that define it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workbench.merge.methods import METHODS, MergeParams, get_method
from workbench.merge.methods.sparsify import bernoulli, della_magprune, magnitude, magnitude_outliers
from workbench.merge.methods.task_arithmetic import agrees, elected_sign

GTA = ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]


def merge(name, base, tensors, shared=None, per_model=None, seed=0):
    per_model = per_model if per_model is not None else [{} for _ in tensors]
    gen = torch.Generator().manual_seed(seed)
    return get_method(name).fn(base, list(tensors), MergeParams(dict(shared or {}), [dict(p) for p in per_model], gen))


def weights(*ws, **extra):
    return [{"weight": w, **extra} for w in ws]


def distinct(shape, seed=0, scale=1.0, dtype=torch.float32):
    """Random signs with distinct magnitudes (no ties in any sort)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    mags = (rng.permutation(n) + 1) / n
    return torch.tensor(scale * mags * rng.choice([-1.0, 1.0], n), dtype=dtype).reshape(shape)


def models(n, shape=(6, 5), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=dtype)
    return base, [base + distinct(shape, seed + i + 1, 0.3, dtype) for i in range(n)]


# ---- registry ---------------------------------------------------------------------------------


MORE = ["sce", "multislerp", "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl"]  # test_merge_methods_more.py


def test_registry_holds_exactly_the_twenty_methods():
    assert sorted(METHODS) == sorted(GTA + ["linear", "slerp", "nuslerp", "model_stock", "passthrough"] + MORE)
    with pytest.raises(KeyError, match="unknown merge method"):
        get_method("frankenmerge")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_param_defaults_lie_within_bounds(name):
    for pname, spec in METHODS[name].params.items():
        if spec.default is None:
            continue
        assert isinstance(spec.default, spec.kind), (name, pname)
        if spec.low is not None:
            assert spec.default >= spec.low, (name, pname)
        if spec.high is not None:
            assert spec.default <= spec.high, (name, pname)


@pytest.mark.parametrize(
    "name,normalize,rescale,random",
    [("task_arithmetic", False, False, False), ("ties", True, False, False), ("dare_ties", False, True, True),
     ("dare_linear", False, True, True), ("breadcrumbs", False, False, False),
     ("breadcrumbs_ties", False, False, False), ("della", True, True, True), ("della_linear", False, True, True)],
)
def test_task_arithmetic_family_params_follow_mergekit(name, normalize, rescale, random):
    m = METHODS[name]
    p = m.params
    assert (p["normalize"].default, p["rescale"].default, m.random, m.base) == (normalize, rescale, random, "required")
    assert p["lambda"].default == 1.0 and p["int8_mask"].default is False
    assert p["weight"].required and p["weight"].per_model and p["weight"].low is None
    assert (p["density"].default, p["density"].low, p["density"].high, p["density"].per_model) == (1.0, 0.0, 1.0, True)
    assert ("gamma" in p) == name.startswith("breadcrumbs")
    assert ("epsilon" in p) == name.startswith("della")
    if "gamma" in p:
        assert p["gamma"].default == 0.01 and p["gamma"].per_model
    if "epsilon" in p:
        assert p["epsilon"].default == 0.15 and p["epsilon"].per_model


def test_other_methods_contracts():
    lin, sl, nu, ms, pt = (METHODS[n] for n in ["linear", "slerp", "nuslerp", "model_stock", "passthrough"])
    assert lin.base == "none" and lin.params["weight"].required and lin.params["normalize"].default is True
    assert sl.base == "required" and (sl.min_models, sl.max_models) == (1, 1)
    assert sl.params["t"].required and (sl.params["t"].low, sl.params["t"].high) == (0.0, 1.0)
    assert nu.base == "optional" and (nu.min_models, nu.max_models) == (2, 2) and nu.params["weight"].required
    assert nu.params["nuslerp_flatten"].default is True and nu.params["nuslerp_row_wise"].default is False
    assert ms.base == "required" and ms.min_models == 2 and ms.params["filter_wise"].default is False
    assert pt.base == "none" and pt.max_models == 1 and pt.params["scale"].per_model
    assert not any(METHODS[n].random for n in ["linear", "slerp", "nuslerp", "model_stock", "passthrough"])


def _call_args(name, dtype):
    base, xs = models(3, dtype=dtype)
    per = {"breadcrumbs": {"gamma": 0.1}, "breadcrumbs_ties": {"gamma": 0.1}}.get(name, {})
    if name in GTA:
        return base, xs, {}, weights(0.5, 0.3, 0.2, density=0.5, **per)
    return {
        "linear": (None, xs, {}, weights(0.5, 0.3, 0.2)),
        "slerp": (base, xs[:1], {"t": 0.3}, [{}]),
        "nuslerp": (base, xs[:2], {}, weights(1.0, 2.0)),
        "model_stock": (base, xs, {}, [{}] * 3),
        "passthrough": (None, xs[:1], {}, [{"scale": 2.0}]),
        "sce": (base, xs, {"select_topk": 0.5}, [{}] * 3),
        "multislerp": (base, xs, {}, weights(0.5, 0.3, 0.2)),
        "karcher": (base, xs, {}, [{}] * 3),
        "nearswap": (base, xs[:1], {"t": 0.1}, [{}]),
        "arcee_fusion": (base, xs[:1], {}, [{}]),
        "ram": (base, xs, {}, [{}] * 3),
        "ramplus_tl": (base, xs, {}, [{}] * 3),
    }[name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_shape_and_dtype_are_kept(name, dtype):
    base, xs, shared, per = _call_args(name, dtype)
    out = merge(name, base, xs, shared, per)
    assert out.shape == xs[0].shape and out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["linear", "nuslerp"] + GTA)
def test_missing_required_weight_is_a_value_error(name):
    base, xs = models(2)
    with pytest.raises(ValueError, match="weight"):
        merge(name, base, xs, {}, [{}, {}])


def test_missing_t_is_a_value_error():
    base, xs = models(1)
    with pytest.raises(ValueError, match="'t'"):
        merge("slerp", base, xs, {}, [{}])


# ---- linear -----------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_weighted_sum(normalize):
    _, xs = models(3)
    w = [0.5, 1.5, -0.25]
    ref = sum(wi * x.numpy().astype(np.float64) for wi, x in zip(w, xs))
    if normalize:
        ref = ref / sum(w)
    out = merge("linear", None, xs, {"normalize": normalize}, weights(*w))
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_linear_one_hot_weights_return_that_model():
    _, xs = models(3)
    for normalize in (True, False):
        out = merge("linear", None, xs, {"normalize": normalize}, weights(0.0, 1.0, 0.0))
        assert torch.equal(out, xs[1])


def test_linear_normalize_makes_weights_relative():
    _, xs = models(2)
    a = merge("linear", None, xs, {}, weights(1.0, 3.0))
    b = merge("linear", None, xs, {}, weights(2.0, 6.0))
    torch.testing.assert_close(a, b)
    c = merge("linear", None, xs, {"normalize": False}, weights(2.0, 6.0))
    torch.testing.assert_close(c, 8.0 * a)


def test_linear_zero_weight_sum_is_rejected_when_normalizing():
    _, xs = models(2)
    with pytest.raises(ValueError, match="sum to 0"):
        merge("linear", None, xs, {}, weights(1.0, -1.0))
    out = merge("linear", None, xs, {"normalize": False}, weights(1.0, -1.0))
    torch.testing.assert_close(out, xs[0] - xs[1])


# ---- slerp ------------------------------------------------------------------------------------


def ref_slerp(t, a, b):
    """Textbook slerp of the flattened tensors (numpy float64), lerp when nearly parallel."""
    a, b = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    cos = np.clip(np.dot(a.ravel() / np.linalg.norm(a), b.ravel() / np.linalg.norm(b)), -1, 1)
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    th = math.acos(cos)
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_reference(t):
    base, xs = models(1, shape=(4, 3, 5))
    out = merge("slerp", base, xs, {"t": t})
    np.testing.assert_allclose(out.numpy(), ref_slerp(t, base, xs[0]), rtol=1e-5, atol=1e-5)


def test_slerp_endpoints_are_exact():
    base, xs = models(1)
    assert torch.equal(merge("slerp", base, xs, {"t": 0.0}), base)
    assert torch.equal(merge("slerp", base, xs, {"t": 1.0}), xs[0])


def test_slerp_midpoint_of_orthogonal_vectors_stays_on_the_circle():
    a = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [0.0, 0.0]])
    out = merge("slerp", a, [b], {"t": 0.5})
    assert out.norm().item() == pytest.approx(3.0, rel=1e-6)  # lerp would give 3/sqrt(2)
    cos_a = (out * a).sum() / (out.norm() * a.norm())
    assert cos_a.item() == pytest.approx(math.cos(math.pi / 4), rel=1e-6)
    third = merge("slerp", a, [b], {"t": 1 / 3}).flatten()
    assert math.atan2(third[1].item(), third[0].item()) == pytest.approx(math.pi / 6, rel=1e-5)


def test_slerp_falls_back_to_lerp_for_nearly_parallel_tensors():
    base, _ = models(0)
    other = 2.0 * base + 1e-4 * torch.ones_like(base)
    out = merge("slerp", base, [other], {"t": 0.3})
    torch.testing.assert_close(out, 0.7 * base + 0.3 * other)
    out = merge("slerp", base, [-base], {"t": 0.25})  # antiparallel: lerp too
    torch.testing.assert_close(out, 0.5 * base)


def test_slerp_needs_exactly_one_other_model():
    base, xs = models(2)
    with pytest.raises(ValueError, match="exactly 1"):
        merge("slerp", base, xs, {"t": 0.5})


# ---- nuslerp ----------------------------------------------------------------------------------


def test_nuslerp_t_is_the_second_models_share_of_the_weight():
    _, xs = models(2, shape=(5, 4))
    out = merge("nuslerp", None, xs, {}, weights(1.0, 3.0))
    np.testing.assert_allclose(out.numpy(), ref_slerp(0.75, xs[0], xs[1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merge("nuslerp", None, xs, {}, weights(2.0, 0.0)), xs[0])
    torch.testing.assert_close(merge("nuslerp", None, xs, {}, weights(0.0, 5.0)), xs[1])
    both = merge("nuslerp", None, xs, {}, weights(1.0, -1.0))  # zero total: t = 0.5
    torch.testing.assert_close(both, merge("nuslerp", None, xs, {}, weights(1.0, 1.0)))


@pytest.mark.parametrize("row_wise", [False, True])
def test_nuslerp_unflattened_slerps_each_row_or_column(row_wise):
    _, xs = models(2, shape=(5, 4))
    out = merge("nuslerp", None, xs, {"nuslerp_flatten": False, "nuslerp_row_wise": row_wise}, weights(3.0, 1.0))
    a, b = (x.T if row_wise else x for x in xs)
    ref = np.stack([ref_slerp(0.25, a[i], b[i]) for i in range(a.shape[0])])
    np.testing.assert_allclose(out.numpy(), ref.T if row_wise else ref, rtol=1e-5, atol=1e-5)


def test_nuslerp_with_base_interpolates_task_vectors():
    base, xs = models(2)
    out = merge("nuslerp", base, xs, {}, weights(1.0, 1.0))
    ref = base.numpy() + ref_slerp(0.5, xs[0] - base, xs[1] - base)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_nuslerp_midpoint_of_orthogonal_vectors_and_colinear_lerp():
    a, b = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    out = merge("nuslerp", None, [a, b], {}, weights(1.0, 1.0))
    torch.testing.assert_close(out, torch.tensor([math.sqrt(2), math.sqrt(2), 0.0]))
    out = merge("nuslerp", None, [a, 3 * a], {}, weights(1.0, 1.0))
    torch.testing.assert_close(out, 2 * a)


# ---- task arithmetic family -------------------------------------------------------------------


def ref_gta(base, xs, w, keep=None, consensus=False, normalize=False, lam=1.0):
    """Per-element loop over the task-arithmetic recipe. ``keep[i]`` masks model i's delta (after
    any rescale factor ``keep`` already carries); TIES elects the sign of the weighted sum and
    averages only the agreeing models, dividing by their weights."""
    b = base.numpy().astype(np.float64).ravel()
    deltas = [x.numpy().astype(np.float64).ravel() - b for x in xs]
    if keep is not None:
        deltas = [d * k.ravel() for d, k in zip(deltas, keep)]
    out = b.copy()
    for j in range(b.size):
        vals = [wi * d[j] for wi, d in zip(w, deltas)]
        if consensus:
            sign = 1.0 if sum(vals) >= 0 else -1.0
            agree = [i for i, v in enumerate(vals) if np.sign(v) == sign]
        else:
            agree = list(range(len(vals)))
        total = sum(vals[i] for i in agree)
        div = sum(w[i] for i in agree)
        if normalize:
            total /= (div if (abs(div) >= 1e-8 if not consensus else div != 0) else 1.0)
        out[j] += lam * total
    return out.reshape(base.shape)


def top_k_mask(delta, density):
    """numpy: 1 for the int(density * n) (at least 1) largest |delta|."""
    d = np.abs(delta.numpy().ravel())
    k = max(1, int(density * d.size))
    mask = np.zeros(d.size)
    mask[np.argsort(-d)[:k]] = 1
    return mask.reshape(delta.shape)


@pytest.mark.parametrize("normalize,lam", [(False, 1.0), (True, 1.0), (False, 0.6), (True, 2.0)])
def test_task_arithmetic_matches_reference(normalize, lam):
    base, xs = models(3)
    w = [0.7, -0.2, 0.4]
    out = merge("task_arithmetic", base, xs, {"normalize": normalize, "lambda": lam}, weights(*w))
    np.testing.assert_allclose(out.numpy(), ref_gta(base, xs, w, normalize=normalize, lam=lam), atol=1e-5)


def test_task_arithmetic_zero_weight_sum_does_not_divide():
    base, xs = models(2)
    out = merge("task_arithmetic", base, xs, {"normalize": True}, weights(1.0, -1.0))
    torch.testing.assert_close(out, base + (xs[0] - xs[1]))


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 0.01])
def test_ties_matches_per_element_reference(density):
    base, xs = models(3, shape=(7, 6))
    w = [1.0, 0.6, 0.3]
    keep = [top_k_mask(x - base, density) for x in xs]
    out = merge("ties", base, xs, {}, weights(*w, density=density))
    ref = ref_gta(base, xs, w, keep=keep, consensus=True, normalize=True)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)
    out = merge("ties", base, xs, {"normalize": False, "int8_mask": True}, weights(*w, density=density))
    np.testing.assert_allclose(out.numpy(), ref_gta(base, xs, w, keep=keep, consensus=True), atol=1e-5)


def test_ties_resolves_sign_conflicts():
    base = torch.zeros(3)
    xs = [torch.tensor([1.0, 2.0, -1.0]), torch.tensor([-3.0, 1.0, 1.0])]
    out = merge("ties", base, xs, {}, weights(1.0, 1.0))
    # entry 0: sum -2 elects '-', only -3 survives; entry 1: both agree; entry 2: sum 0 elects '+'
    torch.testing.assert_close(out, torch.tensor([-3.0, 1.5, 1.0]))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_consensus_methods_at_full_density_with_agreeing_signs_equal_task_arithmetic(name, normalize):
    base, _ = models(0)
    xs = [base + s * distinct(base.shape, i).abs() for i, s in enumerate([0.3, 0.1, 0.5])]
    w = weights(0.5, 1.0, 0.25)
    out = merge(name, base, xs, {"normalize": normalize}, w)
    torch.testing.assert_close(out, merge("task_arithmetic", base, xs, {"normalize": normalize}, w))


@pytest.mark.parametrize("name", ["dare_linear", "breadcrumbs", "della_linear"])
def test_linear_variants_at_full_density_equal_task_arithmetic(name):
    base, xs = models(3)
    w = weights(0.5, -1.0, 0.25)
    for shared in ({}, {"normalize": True, "lambda": 0.5}):
        torch.testing.assert_close(merge(name, base, xs, shared, w), merge("task_arithmetic", base, xs, shared, w))


def test_consensus_count_votes_by_sign():
    deltas = list(torch.tensor([[5.0, 1.0], [-1.0, -1.0], [-1.0, 0.0]]))

    def consensus_mask(method):
        sign = elected_sign(deltas, method)
        return torch.stack([agrees(d, sign) for d in deltas]).bool()

    by_count = consensus_mask("count")
    by_sum = consensus_mask("sum")
    assert by_count.tolist() == [[False, True], [True, False], [True, False]]
    assert by_sum.tolist() == [[True, True], [False, False], [False, False]]


def test_magnitude_keeps_the_k_largest():
    x = distinct((10, 10))
    for density in (0.3, 0.001, 0.0):
        out = magnitude(x, density)
        expected = x * torch.tensor(top_k_mask(x, density), dtype=x.dtype) if density > 0 else torch.zeros_like(x)
        assert torch.equal(out, expected)
    assert int(magnitude(x, 0.001).count_nonzero()) == 1  # k = max(1, int(density * n))
    kept = magnitude(x, 0.3, rescale=True)
    assert kept.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-5)


# ---- DARE -------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_bernoulli_keeps_about_density_and_rescale_preserves_l1(density):
    x = distinct((200, 200))
    g = torch.Generator().manual_seed(1)
    plain = bernoulli(x, density, rescale=False, generator=g)
    kept = plain != 0
    assert abs(kept.float().mean().item() - density) < 0.01
    assert torch.equal(plain[kept], x[kept])
    g = torch.Generator().manual_seed(1)
    scaled = bernoulli(x, density, rescale=True, generator=g)
    assert torch.equal(scaled != 0, kept)  # same seed, same mask
    assert scaled.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-5)
    torch.testing.assert_close(scaled[kept], x[kept] * (x.abs().sum() / x[kept].abs().sum()))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della_linear", "della"])
def test_random_methods_are_reproducible_from_the_seed_only(name):
    base, xs = models(2, shape=(30, 30))
    w = weights(1.0, 0.5, density=0.5, epsilon=0.1) if "della" in name else weights(1.0, 0.5, density=0.5)
    torch.manual_seed(0)
    a = merge(name, base, xs, {}, w, seed=7)
    torch.manual_seed(99)  # the global RNG must not matter
    b = merge(name, base, xs, {}, w, seed=7)
    c = merge(name, base, xs, {}, w, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a != base, c != base)


def test_dare_linear_single_model_is_a_rescaled_random_mask():
    base = torch.zeros(100, 100)
    x = distinct((100, 100))
    out = merge("dare_linear", base, [x], {}, weights(1.0, density=0.3), seed=3)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    assert out.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-5)
    out = merge("dare_linear", base, [x], {"rescale": False}, weights(2.0, density=0.3), seed=3)
    assert torch.equal(out != 0, kept) and torch.equal(out[kept], 2 * x[kept])


def test_dare_ties_matches_reference_given_its_masks():
    base, xs = models(3, shape=(8, 8))
    w = [1.0, 0.5, 0.8]
    g = torch.Generator().manual_seed(11)  # the draws happen model by model, in order
    keep = [bernoulli(torch.ones_like(base), 0.5, generator=g).numpy() for _ in xs]
    keep = [k * np.abs((x - base).numpy()).sum() / (np.abs((x - base).numpy()) * k).sum() for k, x in zip(keep, xs)]
    out = merge("dare_ties", base, xs, {}, weights(*w, density=0.5), seed=11)
    np.testing.assert_allclose(out.numpy(), ref_gta(base, xs, w, keep=keep, consensus=True), atol=1e-5)


# ---- Breadcrumbs ------------------------------------------------------------------------------


def rank_window(x, density, gamma):
    """numpy: mask of the entries whose ascending |x| rank r satisfies lo <= r < lo + n_keep."""
    d = np.abs(x.numpy().ravel())
    n = d.size
    n_keep, n_top = int(density * n), int(gamma * n)
    lo = max(0, n - n_keep - n_top)
    ranks = np.argsort(np.argsort(d))
    return ((ranks >= lo) & (ranks < lo + n_keep)).astype(np.float64).reshape(x.shape)


def test_breadcrumbs_drops_top_gamma_and_the_bottom():
    x = distinct((10, 10))
    out = magnitude_outliers(x, density=0.5, gamma=0.1)
    ranks = x.abs().flatten().argsort().argsort().reshape(x.shape)
    assert torch.equal(out != 0, (ranks >= 40) & (ranks < 90))  # top 10 and bottom 40 dropped
    assert torch.equal(out[out != 0], x[out != 0])
    # density + gamma > 1: fewer outliers go, so that density is still met
    out = magnitude_outliers(x, density=0.95, gamma=0.1)
    assert torch.equal(out != 0, ranks < 95)
    assert torch.equal(magnitude_outliers(x, density=1.0, gamma=0.1), x)
    scaled = magnitude_outliers(x, density=0.5, gamma=0.1, rescale=True)
    assert scaled.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-5)


@pytest.mark.parametrize("name,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
def test_breadcrumbs_methods_match_reference(name, consensus):
    base, xs = models(3, shape=(10, 12))
    w, dens, gam = [1.0, 0.4, 0.7], [0.6, 0.3, 0.9], [0.05, 0.2, 0.15]
    keep = [rank_window(x - base, d, g) for x, d, g in zip(xs, dens, gam)]
    per = [{"weight": a, "density": d, "gamma": g} for a, d, g in zip(w, dens, gam)]
    for normalize in (False, True):
        out = merge(name, base, xs, {"normalize": normalize, "lambda": 0.8}, per)
        ref = ref_gta(base, xs, w, keep=keep, consensus=consensus, normalize=normalize, lam=0.8)
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)


# ---- DELLA ------------------------------------------------------------------------------------


def test_della_keep_probability_rises_with_rank_within_each_row():
    rows, n, density, eps = 20000, 5, 0.5, 0.2
    rng = np.random.default_rng(0)
    ranks = np.argsort(rng.random((rows, n)), axis=1)  # a random permutation of 0..n-1 per row
    row_scale = 10.0 ** rng.uniform(-3, 3, (rows, 1))  # rows of wildly different size: ranks are per row
    x = torch.tensor((ranks + 1) * row_scale * rng.choice([-1.0, 1.0], (rows, n)), dtype=torch.float32)
    out = della_magprune(x, density, eps, generator=torch.Generator().manual_seed(0))
    kept = (out != 0).numpy()
    for r in range(n):
        expected = density - eps + 2 * eps * r / (n - 1)
        assert abs(kept[ranks == r].mean() - expected) < 0.02, r


def test_della_ranks_a_vector_as_one_row():
    v = distinct((9,))
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(della_magprune(v, 0.5, 0.3, generator=g1), della_magprune(v[None], 0.5, 0.3, generator=g2)[0])
    # smallest entry kept with p = 0.2, largest with p = 0.8
    g = torch.Generator().manual_seed(0)
    hits = sum((della_magprune(v, 0.5, 0.3, generator=g) != 0).float() for _ in range(2000)) / 2000
    order = v.abs().argsort()
    assert abs(hits[order[0]].item() - 0.2) < 0.04 and abs(hits[order[-1]].item() - 0.8) < 0.04


@pytest.mark.parametrize("density,eps", [(0.1, 0.15), (0.9, 0.15), (0.5, 0.5)])
def test_della_rejects_epsilon_outside_density_range(density, eps):
    base, xs = models(1)
    with pytest.raises(ValueError, match="epsilon"):
        merge("della", base, xs, {}, weights(1.0, density=density, epsilon=eps))
    merge("della", base, xs, {}, weights(1.0, density=1.0, epsilon=eps))  # density 1: nothing dropped


def test_della_rescale_preserves_l1_and_rescale_off_keeps_values():
    base, x = torch.zeros(100, 100), distinct((100, 100))
    out = merge("della_linear", base, [x], {}, weights(1.0, density=0.4, epsilon=0.1), seed=5)
    assert abs((out != 0).float().mean().item() - 0.4) < 0.025
    assert out.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-5)
    raw = merge("della_linear", base, [x], {"rescale": False}, weights(1.0, density=0.4, epsilon=0.1), seed=5)
    assert torch.equal(raw != 0, out != 0) and torch.equal(raw[raw != 0], x[raw != 0])


# ---- Model Stock ------------------------------------------------------------------------------


def ref_model_stock(base, xs):
    w0 = base.numpy().astype(np.float64).ravel()
    ws = [x.numpy().astype(np.float64).ravel() for x in xs]
    d = [w - w0 for w in ws]
    n = len(ws)
    cos = np.mean([d[i] @ d[j] / (np.linalg.norm(d[i]) * np.linalg.norm(d[j]))
                   for i in range(n) for j in range(i + 1, n)])
    t = n * cos / (1 + (n - 1) * cos)
    return (t * np.mean(ws, axis=0) + (1 - t) * w0).reshape(base.shape)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_model_stock_matches_formula(n):
    base, _ = models(0, shape=(6, 7))
    shared = torch.randn(base.shape, generator=torch.Generator().manual_seed(1))
    xs = [base + shared + 0.8 * distinct(base.shape, i) for i in range(n)]  # correlated deltas: 0 < cos < 1
    out = merge("model_stock", base, xs, {}, [{}] * n)
    np.testing.assert_allclose(out.numpy(), ref_model_stock(base, xs), atol=1e-5)


def test_model_stock_filter_wise_uses_one_t_per_row():
    base, xs = models(3, shape=(5, 8))
    out = merge("model_stock", base, xs, {"filter_wise": True}, [{}] * 3)
    ref = np.stack([ref_model_stock(base[i], [x[i] for x in xs]) for i in range(5)])
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)
    assert not np.allclose(out.numpy(), ref_model_stock(base, xs), atol=1e-4)


def test_model_stock_limits():
    base, _ = models(0)
    d = distinct(base.shape)
    same = merge("model_stock", base, [base + d, base + 2 * d, base + 3 * d], {}, [{}] * 3)
    torch.testing.assert_close(same, base + 2 * d)  # cos = 1: t = 1, plain average
    opposite = merge("model_stock", base, [base + d, base - d], {}, [{}] * 2)
    assert torch.equal(opposite, base)  # 1 + (N-1) cos = 0: keep the base
    e = torch.zeros_like(base)
    e[0, 0] = 1.0
    d[0, 0] = 0.0
    orthogonal = merge("model_stock", base, [base + d, base + e], {}, [{}] * 2)
    torch.testing.assert_close(orthogonal, base)  # cos = 0: t = 0


# ---- Passthrough ------------------------------------------------------------------------------


def test_passthrough_returns_the_tensor_times_scale():
    _, xs = models(1)
    assert torch.equal(merge("passthrough", None, xs, {}, [{}]), xs[0])
    assert torch.equal(merge("passthrough", None, xs, {}, [{"scale": None}]), xs[0])
    torch.testing.assert_close(merge("passthrough", None, xs, {}, [{"scale": -0.5}]), -0.5 * xs[0])
    with pytest.raises(ValueError, match="exactly 1"):
        merge("passthrough", None, xs + xs, {}, [{}, {}])


@pytest.mark.parametrize("n, k", [(1000, 1), (1000, 999), (300_000, 1), (300_000, 150_000), (300_000, 299_999),
                                  (1_000_000, 123_457)])
def test_top_k_mask_selects_exactly_k_like_a_full_sort(n, k):
    from workbench.merge.methods.sparsify import top_k_mask

    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, generator=g).abs()
    w[torch.randint(n, (n // 3,), generator=g)] = 0  # many exact zeros, as in sparse task vectors
    w[:50] = w[50]  # and a run of equal non-zero values
    mask = top_k_mask(w, k)
    by_sort = torch.zeros(n, dtype=torch.bool)
    by_sort[torch.argsort(w, descending=True, stable=True)[:k]] = True
    nonzero = w != 0
    # the same non-zero entries are kept as by a full sort (equal values: lowest index first)
    assert torch.equal(mask & nonzero, by_sort & nonzero)
