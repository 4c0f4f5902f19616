"""mergekit 0.1.5's remaining methods (sce, multislerp, karcher, nearswap, arcee_fusion, ram,
ramplus_tl): each against a plain float64 reference written here (numpy, per-entry loops), the
properties that define it, its declared parameters, recipes that round-trip, and a CLI merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from workbench.cli import main
from workbench.errors import RecipeError
from workbench.merge.methods import METHODS, MergeParams, get_method
from workbench.merge.recipe import dump_recipe, parse_recipe

NEW = ["sce", "multislerp", "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl"]


def merge(name, base, tensors, shared=None, per_model=None):
    per_model = per_model if per_model is not None else [{} for _ in tensors]
    return get_method(name).fn(base, [x.clone() for x in tensors],
                               MergeParams(dict(shared or {}), [dict(p) for p in per_model]))


def family(n, shape=(12, 9), seed=0, scale=0.3, sparse=0.0):
    """A float64 base and n models near it; with ``sparse``, that fraction of each delta is exactly 0."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    xs = []
    for _ in range(n):
        d = torch.randn(shape, generator=g, dtype=torch.float64) * scale
        if sparse:
            d = d * (torch.rand(shape, generator=g, dtype=torch.float64) >= sparse)
        xs.append(base + d)
    return base, xs


def close(out, want, atol=1e-10):
    np.testing.assert_allclose(np.asarray(out, dtype=np.float64), np.asarray(want, dtype=np.float64),
                               atol=atol, rtol=0)


# ---- declarations ------------------------------------------------------------------------------


def test_contracts_follow_mergekit():
    m = METHODS
    assert (m["sce"].base, m["sce"].min_models, m["sce"].max_models) == ("required", 1, None)
    assert m["sce"].params["select_topk"].default == 1.0 and not m["sce"].params["select_topk"].per_model
    assert m["sce"].params["int8_mask"].default is False
    assert (m["multislerp"].base, m["multislerp"].min_models, m["multislerp"].max_models) == ("optional", 1, None)
    w = m["multislerp"].params["weight"]
    assert w.required and w.per_model and w.low is None
    assert m["multislerp"].params["normalize_weights"].default is True and m["multislerp"].params["eps"].default == 1e-8
    assert m["karcher"].base == "optional" and m["karcher"].max_models is None
    assert m["karcher"].params["max_iter"].kind is int and m["karcher"].params["max_iter"].default == 10
    assert m["karcher"].params["tol"].default == 1e-5
    for name in ("nearswap", "arcee_fusion"):
        assert (m[name].base, m[name].min_models, m[name].max_models) == ("required", 1, 1), name
    assert m["nearswap"].params["t"].required and not m["nearswap"].params["t"].per_model
    assert m["arcee_fusion"].params == {}
    assert m["ram"].base == m["ramplus_tl"].base == "required"
    assert m["ram"].params["epsilon"].default == m["ramplus_tl"].params["epsilon"].default == 1e-5
    assert (m["ramplus_tl"].params["r"].default, m["ramplus_tl"].params["alpha"].default) == (0.1, 0.2)
    assert not any(m[n].random or m[n].ranks_magnitudes for n in NEW)
    # mergekit bounds none of these parameters
    assert all(s.low is None and s.high is None for n in NEW for s in m[n].params.values())


@pytest.mark.parametrize("name", NEW)
def test_shape_and_float64_are_kept_and_inputs_untouched(name):
    base, xs = family(3)
    args = {"multislerp": (None, xs, {}, [{"weight": 1.0}] * 3), "nearswap": (base, xs[:1], {"t": 0.1}, None),
            "arcee_fusion": (base, xs[:1], {}, None), "karcher": (None, xs, {}, None)}.get(name, (base, xs, {}, None))
    b, tensors, shared, per_model = args
    before = [x.clone() for x in tensors] + [base.clone()]
    per_model = per_model if per_model is not None else [{} for _ in tensors]
    out = get_method(name).fn(b, tensors, MergeParams(dict(shared), per_model))   # the inputs themselves
    assert out.shape == base.shape and out.dtype == torch.float64 and torch.isfinite(out).all()
    assert all(torch.equal(x, y) for x, y in zip(tensors + [base], before))   # inputs are left as they were


@pytest.mark.parametrize("name, shared, per_model, match", [
    ("nearswap", {}, [{}], "'t'"),
    ("multislerp", {}, [{}, {}], "'weight'"),
    ("multislerp", {}, [{"weight": 1.0}, {"weight": -1.0}], "sum to 0"),
    ("nearswap", {"t": 0.1}, [{}, {}], "exactly 1"),
    ("arcee_fusion", {}, [{}, {}], "exactly 1"),
])
def test_bad_calls_are_value_errors(name, shared, per_model, match):
    base, xs = family(len(per_model))
    with pytest.raises(ValueError, match=match):
        merge(name, base, xs, shared, per_model)


@pytest.mark.parametrize("name", ["sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"])
def test_base_is_required(name):
    _, xs = family(1)
    with pytest.raises(ValueError, match="base"):
        merge(name, None, xs, {"t": 0.1} if name == "nearswap" else {})


# ---- sce -------------------------------------------------------------------------------------


def ref_sce(base, xs, topk=1.0):
    b = base.numpy().ravel()
    d = np.stack([x.numpy().ravel() - b for x in xs])
    n, m = d.shape
    if topk < 1:
        var = ((d - d.mean(0)) ** 2).mean(0)
        k = int(np.count_nonzero(var) * topk) if topk > 0 else 0
        keep = np.zeros(m)
        keep[np.argsort(-var, kind="stable")[:k]] = 1
        d = d * keep
    power = (d ** 2).mean(1)
    w = np.full(n, 1 / n) if abs(power.sum()) < 1e-6 else power / power.sum()
    out = b.copy()
    for j in range(m):
        sign = 1.0 if d[:, j].sum() >= 0 else -1.0
        num = sum(w[i] * d[i, j] for i in range(n) if np.sign(d[i, j]) == sign)
        den = sum(w[i] for i in range(n) if np.sign(d[i, j]) == sign)
        out[j] += num / max(den, 1e-6)
    return out.reshape(base.shape)


@pytest.mark.parametrize("topk", [1.0, 0.7, 0.3, 0.0])
@pytest.mark.parametrize("n", [2, 3])
def test_sce_matches_reference(n, topk):
    base, xs = family(n, seed=n)
    close(merge("sce", base, xs, {"select_topk": topk}), ref_sce(base, xs, topk))


def test_sce_one_model():
    base, (x,) = family(1)
    close(merge("sce", base, [x]), x)   # all its entries agree with themselves: the model
    close(merge("sce", base, [x], {"select_topk": 0.5}), base)   # one model varies nowhere: nothing selected


def test_sce_weighs_models_by_their_mean_square_and_erases_disagreeing_entries():
    base = torch.zeros(4, dtype=torch.float64)
    a = torch.tensor([1.0, 1.0, -1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([2.0, -2.0, 2.0, 0.0], dtype=torch.float64) * 1  # mean squares 0.75 and 3: weights 1/5, 4/5
    out = merge("sce", base, [a, b])
    # entry 0: both agree: (0.2*1 + 0.8*2) / 1; entries 1, 2: b's sign wins (larger sum), a is erased
    close(out, [0.2 * 1 + 0.8 * 2, -2.0, 2.0, 0.0])


# ---- multislerp ------------------------------------------------------------------------------


def ref_multislerp(xs, w, base=None, normalize=True, eps=1e-8):
    v = [x.numpy().ravel() - (0 if base is None else base.numpy().ravel()) for x in xs]
    w = np.asarray(w, dtype=np.float64)
    w = w / w.sum() if normalize else w
    norms = [np.sqrt(sum(e * e for e in vi)) for vi in v]
    u = [vi / (r + eps) for vi, r in zip(v, norms)]
    mean = sum(wi * ui for wi, ui in zip(w, u))
    mean = mean / np.linalg.norm(mean)
    step = sum(wi * (ui - np.dot(ui, mean) * mean) for wi, ui in zip(w, u))
    length = np.linalg.norm(step) + eps
    out = (np.cos(length) * mean + np.sin(length) / length * step) * sum(wi * r for wi, r in zip(w, norms))
    out = out.reshape(xs[0].shape)
    return out if base is None else out + base.numpy()


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_reference(with_base, normalize):
    base, xs = family(3, seed=4)
    b = base if with_base else None
    w = [0.5, 0.3, 0.2] if normalize else [0.3, 0.2, 0.1]
    out = merge("multislerp", b, xs, {"normalize_weights": normalize}, [{"weight": x} for x in w])
    close(out, ref_multislerp(xs, w, b, normalize))


def test_multislerp_is_the_renormalized_weighted_mean_direction_times_the_weighted_mean_norm():
    """The tangent step is taken at the weighted mean direction itself, where the weighted tangent
    vectors sum to zero: the exponential map then moves nowhere (so this is not a Karcher mean)."""
    base, xs = family(3, seed=6)
    w = np.array([0.2, 0.5, 0.3])
    d = [(x - base).numpy() for x in xs]
    direction = sum(wi * di / np.linalg.norm(di) for wi, di in zip(w, d))
    want = base.numpy() + direction / np.linalg.norm(direction) * sum(wi * np.linalg.norm(di) for wi, di in zip(w, d))
    close(merge("multislerp", base, xs, {}, [{"weight": x} for x in w]), want, atol=1e-7)


def test_multislerp_of_one_model_is_that_model():
    base, (x,) = family(1)
    for b in (None, base):
        assert torch.equal(merge("multislerp", b, [x], {}, [{"weight": 0.3}]), x)


def test_multislerp_one_hot_weights_and_equal_norm_midpoint():
    base, xs = family(3, seed=5)
    close(merge("multislerp", None, xs, {}, [{"weight": 0.0}, {"weight": 1.0}, {"weight": 0.0}]), xs[1], atol=1e-7)
    a, b = xs[0], xs[1] * (xs[0].norm() / xs[1].norm())   # equal norms: the slerp midpoint
    theta = torch.arccos(torch.dot(a.ravel(), b.ravel()) / (a.norm() * b.norm()))
    mid = (a + b) * torch.sin(theta / 2) / torch.sin(theta)
    close(merge("multislerp", None, [a, b], {}, [{"weight": 2.0}, {"weight": 2.0}]), mid, atol=1e-7)


def test_multislerp_antipodal_pair_falls_back_to_lerp_and_three_are_refused():
    _, (x,) = family(1)
    close(merge("multislerp", None, [x, -x], {}, [{"weight": 1.0}, {"weight": 1.0}]), 0 * x)
    with pytest.raises(ValueError, match="sum to zero"):
        merge("multislerp", None, [x, -x, x, -x], {}, [{"weight": 1.0}] * 4)


# ---- karcher ---------------------------------------------------------------------------------


def ref_karcher(xs, iters=200):
    """The Karcher mean of the directions by many exp/log-map steps in numpy, times the mean norm."""
    v = [x.numpy().ravel() for x in xs]
    u = [vi / np.linalg.norm(vi) for vi in v]
    m = sum(u) / np.linalg.norm(sum(u))
    for _ in range(iters):
        step = np.zeros_like(m)
        for ui in u:
            c = np.clip(np.dot(m, ui), -1, 1)
            th = np.arccos(c)
            if th > 1e-12:
                step += th / np.sin(th) * (ui - c * m) / len(u)
        s = np.linalg.norm(step)
        if s < 1e-15:
            break
        m = np.cos(s) * m + np.sin(s) * step / s
        m /= np.linalg.norm(m)
    return (np.mean([np.linalg.norm(vi) for vi in v]) * m).reshape(xs[0].shape)


def spread(n, shape=(12, 9), seed=0):
    """Unrelated random tensors of different norms: directions far apart (about 90 degrees)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * (i + 1) for i in range(n)]


@pytest.mark.parametrize("n", [3, 4])
def test_karcher_matches_reference_and_is_a_critical_point(n):
    xs = spread(n, seed=n)
    out = merge("karcher", None, xs, {"max_iter": 50, "tol": 1e-12})
    close(out, ref_karcher(xs), atol=1e-9)
    m = (out / out.norm()).ravel()
    logs = []   # at the Karcher mean the log maps of the directions sum to zero
    for x in xs:
        u = (x / x.norm()).ravel()
        c = torch.dot(m, u)
        logs.append(torch.arccos(c) / torch.sqrt(1 - c * c) * (u - c * m))
    assert torch.stack(logs).sum(0).norm() < 1e-8
    assert out.norm().item() == pytest.approx(np.mean([x.norm().item() for x in xs]))


def test_karcher_of_identical_models_is_that_model():
    _, (x,) = family(1)
    close(merge("karcher", None, [x, x.clone(), x.clone()]), x)
    assert torch.equal(merge("karcher", None, [x]), x)


def test_karcher_of_two_is_slerp_midpoint_of_directions_times_mean_norm():
    a, b = spread(2)
    ua, ub = a / a.norm(), b / b.norm()
    theta = torch.arccos(torch.dot(ua.ravel(), ub.ravel()))
    mid = (ua + ub) * torch.sin(theta / 2) / torch.sin(theta)
    close(merge("karcher", None, [a, b]), mid * (a.norm() + b.norm()) / 2)
    b = b * a.norm() / b.norm()   # equal norms: exactly slerp at t = 0.5
    close(merge("karcher", None, [a, b]), get_method("slerp").fn(a, [b], MergeParams({"t": 0.5}, [{}])))


def test_karcher_counts_the_base_as_a_model_and_max_iter_zero_is_the_projected_mean():
    xs = spread(3, seed=7)
    assert torch.equal(merge("karcher", xs[2], xs[:2]), merge("karcher", None, xs))
    start = sum(x / x.norm() for x in xs)
    want = start / start.norm() * np.mean([x.norm().item() for x in xs])
    close(merge("karcher", None, xs, {"max_iter": 0}), want)
    assert (merge("karcher", None, xs) - want).abs().max() > 1e-3   # iterating moves it


def test_karcher_ignores_zero_tensors_for_the_direction():
    a, b = spread(2, seed=3)
    out = merge("karcher", None, [a, b, torch.zeros_like(a)])
    two = merge("karcher", None, [a, b])
    close(out, two * 2 / 3)   # the direction of a and b, the zero's norm in the mean norm


# ---- nearswap --------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.0, 1e-3, 0.1, 0.3, 10.0, -0.5])
def test_nearswap_matches_per_entry_reference(t):
    base, (x,) = family(1)
    out = merge("nearswap", base, [x], {"t": t})
    a, b = base.numpy().ravel(), x.numpy().ravel()
    want = []
    for ai, bi in zip(a, b):   # move toward the other model by at most t (swap when closer than t)
        step = min(max(bi - ai, -t), t) if t > 0 else 0.0
        want.append(ai + step)
    close(out, np.reshape(want, base.shape))


def test_nearswap_ends():
    base, (x,) = family(1)
    assert torch.equal(merge("nearswap", base, [x], {"t": 0.0}), base)
    assert torch.equal(merge("nearswap", base, [x], {"t": 1e9}), x)
    assert torch.equal(merge("nearswap", base, [base.clone()], {"t": 0.2}), base)


# ---- arcee_fusion ----------------------------------------------------------------------------


def ref_arcee_fusion(base, x):
    b2 = base.numpy().reshape(-1, base.shape[-1])
    x2 = x.numpy().reshape(-1, base.shape[-1])
    score = np.empty_like(x2)
    for i in range(len(x2)):
        p = np.exp(x2[i] - x2[i].max()); p = p / p.sum() + 1e-8
        q = np.exp(b2[i] - b2[i].max()); q = q / q.sum() + 1e-8
        score[i] = np.abs(x2[i] - b2[i]) * np.sum(p * np.log(p / q))
    s = np.sort(score.ravel())
    q1, med, q3 = (s[int(f * (s.size - 1))] for f in (0.25, 0.5, 0.75))
    keep = score >= med + 1.5 * (q3 - q1)
    return np.where(keep, x2, b2).reshape(base.shape), keep


@pytest.mark.parametrize("shape", [(40, 16), (200,), (3, 5, 7)])
def test_arcee_fusion_matches_reference(shape):
    base, (x,) = family(1, shape, seed=2)
    out = merge("arcee_fusion", base, [x])
    want, keep = ref_arcee_fusion(base, x)
    close(out, want)
    assert 0 < keep.mean() < 0.5   # an outlier threshold keeps a minority of the changes


def test_arcee_fusion_of_a_model_with_itself_is_that_model():
    base, _ = family(1)
    assert torch.equal(merge("arcee_fusion", base, [base.clone()]), base)


def test_arcee_fusion_entries_are_the_base_or_the_other_model():
    base, (x,) = family(1, (64, 32), seed=9)
    out = merge("arcee_fusion", base, [x])
    assert bool(((out == base) | (out == x)).all()) and bool((out == x).any()) and bool((out == base).any())


# ---- ram / ramplus_tl ------------------------------------------------------------------------


def ref_ram(base, xs, eps=1e-5, r=None, alpha=None):
    b = base.numpy().ravel()
    d = [x.numpy().ravel() - b for x in xs]
    nz = [[abs(v) > eps for v in di] for di in d]
    count = [sum(nz[i][j] for i in range(len(d))) for j in range(b.size)]
    gain = [1.0] * len(d)
    if r is not None:   # RAM+: per model, entries it shares with others vs entries only it changes
        for i in range(len(d)):
            shared = sum(1 for j in range(b.size) if nz[i][j] and count[j] > 1)
            unique = sum(1 for j in range(b.size) if nz[i][j] and count[j] == 1)
            gain[i] = 1 + r * min(max(shared / max(unique, eps), 0), alpha)
    out = b.copy()
    for j in range(b.size):
        for i in range(len(d)):
            if nz[i][j]:
                out[j] += d[i][j] * gain[i] if count[j] == 1 else d[i][j] / count[j]
    return out.reshape(base.shape)


@pytest.mark.parametrize("eps", [1e-5, 0.2])
@pytest.mark.parametrize("n", [2, 3])
def test_ram_and_ramplus_match_reference(n, eps):
    base, xs = family(n, sparse=0.5, seed=10 + n)
    close(merge("ram", base, xs, {"epsilon": eps}), ref_ram(base, xs, eps))
    close(merge("ramplus_tl", base, xs, {"epsilon": eps}), ref_ram(base, xs, eps, 0.1, 0.2))
    close(merge("ramplus_tl", base, xs, {"epsilon": eps, "r": 0.5, "alpha": 5.0}), ref_ram(base, xs, eps, 0.5, 5.0))


def test_ram_keeps_disjoint_changes_whole_and_averages_shared_ones():
    base = torch.zeros(6, dtype=torch.float64)
    a = torch.tensor([1.0, 0, 0, 2.0, 0, 0], dtype=torch.float64)
    b = torch.tensor([0, 3.0, 0, 4.0, 0, 0], dtype=torch.float64)
    c = torch.tensor([0, 0, 5.0, 0, 0, 0], dtype=torch.float64)
    close(merge("ram", base, [a, b, c]), [1.0, 3.0, 5.0, 3.0, 0, 0])
    # RAM+: a and b each have 1 shared and 1 unique entry (gain 1 + 0.1 * min(0.2, 1)), c only unique ones
    close(merge("ramplus_tl", base, [a, b, c]), [1.02, 3.06, 5.0, 3.0, 0, 0])
    close(merge("ramplus_tl", base, [a, b, c], {"r": 0.0}), merge("ram", base, [a, b, c]))
    close(merge("ram", base, [a, b, c], {"epsilon": 2.5}), [0, 3.0, 5.0, 4.0, 0, 0])


def test_ram_of_identical_models_is_that_model():
    base, (x,) = family(1)
    close(merge("ram", base, [x, x.clone(), x.clone()]), x)
    close(merge("ram", base, [x]), x)


# ---- recipes ---------------------------------------------------------------------------------


RECIPES = {
    "sce": "merge_method: sce\nbase_model: base\nmodels: [{model: a}, {model: b}]\n"
           "parameters: {select_topk: [0.2, 0.8], int8_mask: true}\n",
    "multislerp": "merge_method: multislerp\nbase_model: base\nmodels:\n  - {model: a, parameters: {weight: 0.7}}\n"
                  "  - {model: b, parameters: {weight: [{filter: mlp, value: 0.1}, {value: 0.3}]}}\n"
                  "parameters: {normalize_weights: false, eps: 1.0e-07}\n",
    "karcher": "merge_method: karcher\nmodels: [{model: base}, {model: a}, {model: b}]\n"
               "parameters: {max_iter: 20, tol: 1.0e-06}\n",
    "nearswap": "merge_method: nearswap\nbase_model: base\nmodels: [{model: base}, {model: a}]\n"
                "parameters: {t: [0.0001, 0.01]}\ndtype: float32\n",
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: base\nmodels: [{model: base}, {model: a}]\n",
    "ram": "merge_method: ram\nbase_model: base\nmodels: [{model: a}, {model: b}]\nparameters: {epsilon: 1.0e-06}\n",
    "ramplus_tl": "merge_method: ramplus_tl\nbase_model: base\nmodels: [{model: a}, {model: b}]\n"
                  "parameters: {r: 0.2, alpha: 0.5, epsilon: 1.0e-05}\n",
}


@pytest.mark.parametrize("name", NEW)
def test_recipes_read_and_round_trip(name):
    r = parse_recipe(RECIPES[name], "r.yml")
    assert r.merge_method == name
    again = parse_recipe(dump_recipe(r), "again.yml")
    assert again.to_dict() == r.to_dict() and again.parameters == r.parameters


@pytest.mark.parametrize("text, words", [
    (RECIPES["nearswap"].replace("parameters: {t: [0.0001, 0.01]}\n", ""), ["needs the parameter 't'"]),
    (RECIPES["nearswap"].replace("{model: a}", "{model: a}, {model: b}"), ["exactly 1"]),
    (RECIPES["arcee_fusion"].replace("base_model: base\n", ""), ["needs a base_model"]),
    (RECIPES["arcee_fusion"] + "parameters: {t: 0.5}\n", ["unknown parameter", "it takes: none"]),
    (RECIPES["multislerp"].replace("weight: 0.7", "scale: 0.7"), ["unknown parameter"]),
    (RECIPES["multislerp"].replace("  - {model: a, parameters: {weight: 0.7}}", "  - {model: a}"),
     ["'weight' is missing"]),
    (RECIPES["sce"].replace("models: [{model: a}, {model: b}]",
                            "models: [{model: a, parameters: {select_topk: 0.5}}]"), ["shared parameter"]),
    (RECIPES["karcher"].replace("max_iter: 20", "max_iter: true"), ["expected a number"]),
    (RECIPES["ram"].replace("base_model: base\n", ""), ["needs a base_model"]),
])
def test_bad_recipes_are_refused(text, words):
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "bad.yml")
    for w in words:
        assert w in str(e.value), str(e.value)


# ---- end to end ------------------------------------------------------------------------------


def state(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def cli_recipe(name, base, a, b):
    """The recipes of the CLI test, with the reference merge of one tensor given the inputs (float64)."""
    return {
        "sce": (f"merge_method: sce\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
                "parameters: {select_topk: 0.5}\n", lambda S, A, B: ref_sce(S, [A, B], 0.5)),
        "multislerp": (f"merge_method: multislerp\nbase_model: {base}\nmodels:\n"
                       f"  - {{model: {a}, parameters: {{weight: 0.7}}}}\n  - {{model: {b}, parameters: {{weight: 0.3}}}}\n",
                       lambda S, A, B: ref_multislerp([A, B], [0.7, 0.3], S)),
        # the base model is not listed: as in mergekit, it is one of the averaged models
        "karcher": (f"merge_method: karcher\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n",
                    lambda S, A, B: ref_karcher([A, B, S])),
        "nearswap": (f"merge_method: nearswap\nbase_model: {base}\nmodels: [{{model: {a}}}]\nparameters: {{t: 0.01}}\n",
                     lambda S, A, B: (S + (A - S).clamp(-0.01, 0.01)).numpy()),
        "arcee_fusion": (f"merge_method: arcee_fusion\nbase_model: {base}\nmodels: [{{model: {base}}}, {{model: {a}}}]\n",
                         lambda S, A, B: ref_arcee_fusion(S, A)[0]),
        "ram": (f"merge_method: ram\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
                "parameters: {epsilon: 0.01}\n", lambda S, A, B: ref_ram(S, [A, B], 0.01)),
        "ramplus_tl": (f"merge_method: ramplus_tl\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
                       "parameters: {epsilon: 0.02, r: 0.5, alpha: 1.0}\n",
                       lambda S, A, B: ref_ram(S, [A, B], 0.02, 0.5, 1.0)),
    }[name]


@pytest.mark.parametrize("name", NEW)
def test_cli_merge_makes_a_loadable_model_matching_the_reference(name, tiny_models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base, a, b = tiny_models("llama", 3, num_layers=2)
    text, ref = cli_recipe(name, base, a, b)
    recipe = tmp_path / "r.yml"
    recipe.write_text(text)
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 0, capsys.readouterr().err
    S, A, B, M = state(base), state(a), state(b), state(out)
    assert set(M) == set(S)
    flips = 0   # the same formula in float64, per tensor; entries at a selection threshold may flip
    for n in S:
        want = np.asarray(ref(S[n].double(), A[n].double(), B[n].double()), dtype=np.float64)
        flips += int((np.abs(M[n].double().numpy() - want) > 1e-6).sum())
    assert flips <= (5 if name in ("arcee_fusion", "sce") else 0), flips
    assert not all(torch.equal(M[n], S[n]) for n in S) and not all(torch.equal(M[n], A[n]) for n in S)
    assert (out / "mergekit_config.yml").is_file()
    again = parse_recipe((out / "mergekit_config.yml").read_text(), "again.yml")
    assert again.merge_method == name and again.parameters == parse_recipe(text, "r.yml").parameters
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, 96) and torch.isfinite(logits).all()



@pytest.mark.parametrize("name, evolve, sources", [
    ("sce", {"select_topk": [0.1, 1.0]}, 2), ("multislerp", {"weight": [0.1, 1.0]}, 2),
    ("nearswap", {"t": [0.0, 0.05]}, 1),
])
def test_searchable_methods_make_recipes_that_plan(name, evolve, sources, tiny_models):
    from workbench.merge.plan import plan_merge
    from workbench.search.genome import GenomeLayout
    from workbench.search.spec import spec_from_dict

    base, a, b = tiny_models("llama", 3, num_layers=2)
    spec = spec_from_dict({"models": [str(a), str(b)][:sources], "base_model": str(base), "merge_method": name,
                           "evolve": evolve, "granularity": "per_layer", "objective": ["synthetic"]})
    layout = GenomeLayout(spec, num_layers=2)
    x = np.random.default_rng(0).uniform(size=len(layout))
    recipe = layout.to_recipe(x)
    np.testing.assert_allclose(layout.from_recipe(recipe), x, atol=1e-5)
    plan = plan_merge(recipe)
    try:
        job = next(j for j in plan.jobs if j.out_name == "model.layers.1.mlp.up_proj.weight")
        (param, (low, high)), = evolve.items()
        gene = next(xi for g, xi in zip(layout.genes, x) if g.group == 1 and g.model in (None, str(a)))
        got = job.params.shared[param] if job.params.shared.get(param) is not None else job.params.per_model[0][param]
        assert got == pytest.approx(low + gene * (high - low), abs=1e-6)
        assert job.base is not None and len(job.others) == sources
    finally:
        plan.close()
