"""The integer CPU kernels (`lowbit_gemm_q8`, the default ``WORKBENCH_KERNELS`` mode) against an
independent float64 reference, on every instruction set this CPU has (avx512vnni, avxvnni, avx2,
scalar), the wide kernel for batches (`lowbit_gemm_q8w`), and the dispatch around them: the crossovers
to the wide kernel and to dequantize + bf16 matmul, their cache, the ISA choice and the fallback when
the build fails.

The stated bound (`kernels.INT8_ERROR_BOUND`): activations are rounded to int8 per block of 64, each
moving by at most max|x_block| / 254, so |y - x @ W.T| <= sum_j max|x_j| / 254 * sum_{k in j} |W[n, k]|
per output; fp32 accumulation adds at most 1e-5 of |x| @ |W|.T. The kernel's output must also equal
xhat @ W.T (xhat: x quantized here, in torch) to fp32 rounding: the integer part is exact.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from workbench.quant import kernels
from workbench.quant.linear import QuantLinear
from workbench.quant.quantizers import quantize_weight

INT_ISAS = ["avx512vnni", "avxvnni", "avx2", "scalar"]
# (N, K, group sizes): K not a multiple of 64 or 256, odd chunk counts, groups below/at/above a block,
# group sizes that are not multiples of 16 (40, 48) or too small for a vector's lanes (8: float path)
SHAPES = [
    (37, 96, [16, 32, 48]),
    (64, 200, [8, 40]),
    (5, 80, [16]),
    (70, 576, [16, 32, 64, 192]),
    (9, 1024, [64, 128, 256]),
    (130, 320, [64, 320]),
    (33, 1088, [64]),
]
CASES = [(n, k, g) for n, k, gs in SHAPES for g in gs]
BATCHES = [1, 2, 3, 5, 16]
KINDS = {"asym": 2, "ternary": 1.58}
DRIVER = Path(__file__).parents[1] / "kernels" / "cpu" / "test_driver.cpp"


def make_layer(n: int, k: int, group: int, kind: str, seed: int = 0, lora_rank: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    method = "rtn" if kind == "asym" else "absmean"
    layer = QuantLinear.from_quantized(quantize_weight(w, KINDS[kind], group, method), lora_rank=lora_rank)
    if lora_rank:
        layer.lora_A.data.normal_(generator=g)
        layer.lora_B.data.normal_(generator=g)
    return layer


def activations(batch: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, k, generator=g)
    x[:, ::37] *= 12.0  # outlier channels, as LLM activations have
    return x


def quantize_reference(x: torch.Tensor) -> torch.Tensor:
    """xhat: x rounded to int8 per block of 64 (dx = max|x| / 127, round half to even), in float64."""
    b, k = x.shape
    xp = torch.nn.functional.pad(x.double(), (0, (-k) % 64)).view(b, -1, 64)
    amax = xp.abs().amax(-1, keepdim=True).float()
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xp.float() * inv)  # the kernel's float product, then half-to-even
    return (q.double() * (amax / 127.0).double()).view(b, -1)[:, :k]


def error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """kernels.INT8_ERROR_BOUND * sum_j max|x_j| * |W_j| summed, [B, N], plus the fp32 slack."""
    b, k = x.shape
    nb = (k + 63) // 64
    xp = torch.nn.functional.pad(x.double().abs(), (0, nb * 64 - k)).view(b, nb, 64)
    wp = torch.nn.functional.pad(w.double().abs(), (0, nb * 64 - k)).view(w.shape[0], nb, 64)
    amax = xp.amax(-1)  # [B, nb]
    bound = kernels.INT8_ERROR_BOUND * amax @ wp.sum(-1).T
    return bound + 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-9


@pytest.fixture(scope="module")
def ops():
    ops = kernels.cpu_ops()
    if ops is None:
        pytest.skip(f"the CPU kernels could not be built: {kernels.available(build=False)}")
    yield ops
    ops.lowbit_set_int_isa("auto")


@pytest.fixture(params=INT_ISAS)
def isa(request, ops):
    got = ops.lowbit_set_int_isa(request.param)
    if got != request.param:
        ops.lowbit_set_int_isa("auto")
        pytest.skip(f"this CPU has no {request.param} (lowered to {got})")
    yield got
    ops.lowbit_set_int_isa("auto")


def q8(ops, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    zero = torch.empty(0) if layer.zero is None else layer.zero.data
    return ops.lowbit_gemm_q8(x, layer.qweight, layer.scale.data, zero, layer.group_size, layer.in_features)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n,k,group", CASES)
def test_int8_kernel_within_the_bound(isa, ops, n, k, group, kind):
    layer = make_layer(n, k, group, kind, seed=n + k + group)
    w = layer.dequantized_weight(torch.float64)
    for batch in BATCHES:
        x = activations(batch, k, seed=batch)
        y = q8(ops, layer, x)
        assert y.shape == (batch, n) and y.dtype == torch.float32
        exact = x.double() @ w.T
        err = (y.double() - exact).abs()
        assert (err <= error_bound(x, w)).all(), (isa, batch, (err - error_bound(x, w)).max().item())
        # the integer part is exact: the output is xhat @ W.T up to fp32 rounding
        # (group 8 takes the float kernel on the SIMD ISAs: no activation rounding at all)
        target = exact if group % 4 or (group < 12 and isa != "scalar") else quantize_reference(x) @ w.T
        slack = 1e-5 * (x.double().abs() @ w.abs().T) + 1e-9
        assert ((y.double() - target).abs() <= slack).all(), (isa, batch)
        rel = (err.norm() / exact.norm()).item()
        assert rel < 0.05, (isa, batch, rel)  # 1-2% with these outliers (0.6% for Gaussian x)

        yb = q8(ops, layer, x.bfloat16())
        assert yb.dtype == torch.bfloat16
        xb = x.bfloat16().float()
        errb = (yb.double() - xb.double() @ w.T).abs()
        assert (errb <= error_bound(xb, w) + 2 ** -8 * (xb.double() @ w.T).abs()).all(), (isa, batch)


def test_gaussian_relative_error_is_about_half_a_percent(ops):
    layer = make_layer(512, 2048, 64, "asym")
    x = torch.randn(4, 2048, generator=torch.Generator().manual_seed(3))
    exact = x.double() @ layer.dequantized_weight(torch.float64).T
    rel = ((q8(ops, layer, x).double() - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel < 1e-2, rel


def test_every_isa_gives_the_same_quantization(ops):
    """Same int8 activations on every path: outputs agree to fp32 rounding across ISAs."""
    layer = make_layer(70, 576, 64, "asym")
    x = activations(3, 576, seed=9)
    outs = {}
    for name in INT_ISAS:
        if ops.lowbit_set_int_isa(name) == name:
            outs[name] = q8(ops, layer, x)
    ops.lowbit_set_int_isa("auto")
    ref = outs["scalar"]
    for name, y in outs.items():
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item()), name


def test_dispatch_picks_the_best_isa_and_lowers(ops):
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    best = ("avx512vnni" if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags
            else "avxvnni" if "avx_vnni" in flags else "avx2" if {"avx2", "fma"} <= flags else "scalar")
    assert ops.lowbit_set_int_isa("auto") == best
    assert kernels.available()["cpu"]["int_isa"] == best
    assert ops.lowbit_set_int_isa("neon") == "scalar"  # not an ARM CPU: the best below it
    assert ops.lowbit_set_int_isa("scalar") == "scalar"
    assert kernels.set_isa("avx2", ops) == {"int": "avx2", "float": "avx2" if "avx2" in flags else "scalar"}
    assert kernels.set_isa("auto", ops)["int"] == best
    with pytest.raises(ValueError, match="WORKBENCH_KERNELS_ISA"):
        kernels.set_isa("sse9", ops)


def test_isa_env_is_applied_at_load(ops, monkeypatch):
    monkeypatch.setenv("WORKBENCH_KERNELS_ISA", "scalar")
    try:
        kernels.apply_isa_env(ops)  # what _build_cpu does once the library is loaded
        assert ops.lowbit_int_isa() == "scalar" and ops.lowbit_isa() == "scalar"
        monkeypatch.setenv("WORKBENCH_KERNELS_ISA", "pentium")
        with pytest.warns(RuntimeWarning, match="pentium"):
            kernels.apply_isa_env(ops)
        assert ops.lowbit_int_isa() == "scalar"  # unchanged
    finally:
        kernels.set_isa("auto", ops)


def q8w(ops, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    zero = torch.empty(0) if layer.zero is None else layer.zero.data
    return ops.lowbit_gemm_q8w(x, layer.qweight, layer.scale.data, zero, layer.group_size, layer.in_features)


# rows not a multiple of 16 (a partial last tile), K of 1-70 blocks, group sizes 64-320 (the wide
# kernel's; 16 and 32 take lowbit_gemm_q8 through it)
WIDE_CASES = [(37, 128, 64), (16, 64, 64), (70, 576, 192), (33, 1088, 64), (130, 1024, 256), (9, 320, 320),
              (40, 256, 32), (24, 96, 16)]
WIDE_BATCHES = [1, 2, 11, 12, 13, 25, 37, 64]  # groups of up to 12 activation rows, split evenly


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n,k,group", WIDE_CASES)
def test_wide_kernel_within_the_bound(ops, n, k, group, kind):
    """lowbit_gemm_q8w on this CPU's best ISA: within INT8_ERROR_BOUND of the float64 product, and
    equal to xhat @ W.T (the integer part exact) and to lowbit_gemm_q8 up to fp32 rounding."""
    layer = make_layer(n, k, group, kind, seed=n * k + group)
    w = layer.dequantized_weight(torch.float64)
    for batch in WIDE_BATCHES:
        x = activations(batch, k, seed=batch + 100)
        y = q8w(ops, layer, x)
        assert y.shape == (batch, n) and y.dtype == torch.float32
        exact = x.double() @ w.T
        assert ((y.double() - exact).abs() <= error_bound(x, w)).all(), (batch, n, k, group)
        slack = 1e-5 * (x.double().abs() @ w.abs().T) + 1e-9
        assert ((y.double() - quantize_reference(x) @ w.T).abs() <= slack).all(), batch
        assert ((y - q8(ops, layer, x)).abs().double() <= 2 * slack).all(), batch
        yb = q8w(ops, layer, x.bfloat16())
        assert yb.dtype == torch.bfloat16
        xb = x.bfloat16().float()
        errb = (yb.double() - xb.double() @ w.T).abs()
        assert (errb <= error_bound(xb, w) + 2 ** -8 * (xb.double() @ w.T).abs()).all(), batch


def test_wide_kernel_on_lower_isas_is_the_int8_kernel(ops):
    """Without AVX-512 VNNI the wide op runs lowbit_gemm_q8: the same output bit for bit."""
    layer = make_layer(40, 256, 64, "asym")
    x = activations(20, 256, seed=5)
    try:
        for name in ("avxvnni", "avx2", "scalar"):
            if ops.lowbit_set_int_isa(name) == name:
                assert torch.equal(q8w(ops, layer, x), q8(ops, layer, x)), name
    finally:
        ops.lowbit_set_int_isa("auto")


@pytest.mark.parametrize("lora", [0, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batches_across_the_crossover(ops, monkeypatch, lora, dtype):
    """Rows 1..64 through QuantLinear: the int8 kernel up to the crossover (8 here), the wide int8
    kernel up to 32, dequantize + bf16 matmul above; each within its bound of the float64 reference,
    LoRA included, and each row count reaching the kernel meant for it."""
    monkeypatch.setenv("WORKBENCH_KERNELS", "1")
    monkeypatch.setenv("WORKBENCH_KERNELS_CROSSOVER", "8")
    monkeypatch.setenv("WORKBENCH_KERNELS_WIDE", "32")
    layer = make_layer(96, 320, 64, "asym", lora_rank=lora)
    w = layer.dequantized_weight(torch.float64)
    calls = {"gemm_q8": 0, "gemm_q8w": 0}
    for key in calls:
        real = kernels._cpu.get(key) or getattr(ops, f"lowbit_{key}").default

        def counting(*args, key=key, real=real):
            calls[key] += 1
            return real(*args)

        monkeypatch.setitem(kernels._cpu, key, counting)
    for rows in (1, 2, 7, 8, 9, 16, 31, 32, 33, 64):
        path = "int8" if rows <= 8 else "int8-wide" if rows <= 32 else "dequant+bf16"
        assert kernels.cpu_path(rows) == path
        x = activations(rows, 320, seed=rows).to(dtype)
        before = dict(calls)
        with torch.no_grad():
            y = layer(x.view(1, rows, 320))[0]
        assert calls["gemm_q8"] - before["gemm_q8"] == (path == "int8"), rows
        assert calls["gemm_q8w"] - before["gemm_q8w"] == (path == "int8-wide"), rows
        xd = x.double()
        exact, mags = xd @ w.T, xd.abs() @ w.abs().T
        if lora:
            a, b = layer.lora_A.double(), layer.lora_B.double()
            exact = exact + (xd @ a.T) @ b.T * layer.scaling
            lora_mags = (xd.abs() @ a.abs().T) @ b.abs().T * layer.scaling
        # the int8 bound up to the wide rows; above, bf16 rounding of x, W and the output (2^-8 each)
        bound = error_bound(x.float(), w) if rows <= 32 else 3 * 2 ** -8 * mags
        if dtype == torch.bfloat16:  # the output, and QuantLinear's bf16 LoRA matmuls, round to bf16
            bound = bound + 2 ** -8 * exact.abs() + (2 ** -6 * lora_mags if lora else 0)
        elif lora:  # the fp32 LoRA loops
            bound = bound + 1e-5 * lora_mags
        assert ((y.double() - exact).abs() <= bound).all(), (rows, dtype, lora)


def test_crossover_is_measured_once_and_cached(ops, monkeypatch, tmp_path):
    monkeypatch.delenv("WORKBENCH_KERNELS_CROSSOVER", raising=False)
    monkeypatch.setattr(kernels, "_crossover_path", lambda: tmp_path / kernels.CROSSOVER_FILE)
    monkeypatch.delitem(kernels._cpu, "crossover", raising=False)
    measured, real = [], kernels.measure_crossover

    def small_measure(o):
        measured.append(1)
        return real(o, n=256, k=256, repeats=2)

    monkeypatch.setattr(kernels, "measure_crossover", small_measure)
    monkeypatch.delenv("WORKBENCH_KERNELS_WIDE", raising=False)
    value, wide = kernels.crossover(), kernels.wide_rows()
    data = json.loads((tmp_path / kernels.CROSSOVER_FILE).read_text())
    assert value == data["crossover"] and value in kernels.CROSSOVER_LADDER and data["isa"] == ops.lowbit_int_isa()
    assert wide == data["wide"] and wide in kernels.CROSSOVER_LADDER and wide >= value
    for key in ("int8_ms", "int8_wide_ms", "dequant_bf16_matmul_ms"):
        assert set(data[key]) == {str(r) for r in kernels.CROSSOVER_LADDER}
    # the rule: the int8 kernel beats both others at every count up to the crossover; the wide one
    # beats dequantize + matmul at every count above it up to `wide`, and loses at the next
    ms = {key: {int(r): t for r, t in data[key].items()} for key in ("int8_ms", "int8_wide_ms", "dequant_bf16_matmul_ms")}
    for r in kernels.CROSSOVER_LADDER:
        if 1 < r <= value:
            assert ms["int8_ms"][r] <= min(ms["int8_wide_ms"][r], ms["dequant_bf16_matmul_ms"][r]), r
        elif value < r <= wide:
            assert ms["int8_wide_ms"][r] <= ms["dequant_bf16_matmul_ms"][r], r
    above = [r for r in kernels.CROSSOVER_LADDER if r > wide]
    if above and wide > value:
        assert ms["int8_wide_ms"][above[0]] > ms["dequant_bf16_matmul_ms"][above[0]]
    monkeypatch.delitem(kernels._cpu, "crossover")  # a new process: read from the file, not measured
    assert kernels.crossover() == value and kernels.wide_rows() == wide and measured == [1]
    monkeypatch.setenv("WORKBENCH_KERNELS_CROSSOVER", "3")
    monkeypatch.setenv("WORKBENCH_KERNELS_WIDE", "5")
    assert kernels.crossover() == 3 and kernels.wide_rows() == 5


def test_crossover_default_when_measuring_fails(ops, monkeypatch, tmp_path):
    monkeypatch.delenv("WORKBENCH_KERNELS_CROSSOVER", raising=False)
    monkeypatch.setattr(kernels, "_crossover_path", lambda: tmp_path / kernels.CROSSOVER_FILE)
    monkeypatch.delitem(kernels._cpu, "crossover", raising=False)

    def failing(o):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(kernels, "measure_crossover", failing)
    monkeypatch.delenv("WORKBENCH_KERNELS_WIDE", raising=False)
    with pytest.warns(RuntimeWarning, match="crossover"):
        assert kernels.crossover() == kernels.DEFAULT_CROSSOVER
    assert kernels.wide_rows() == kernels.DEFAULT_CROSSOVER  # no wide rows: dequantize + bf16 matmul above
    assert not (tmp_path / kernels.CROSSOVER_FILE).exists()


def test_a_compile_failure_falls_back_to_torch_once(monkeypatch, tmp_path):
    """A real compiler error (a broken copy of the source): one warning, then the pure-torch path."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    broken = tmp_path / "lowbit.cpp"
    broken.write_text('#include "simulated_compile_failure.h"\n' + kernels.CPU_SOURCE.read_text())
    monkeypatch.setattr(kernels, "CPU_SOURCE", broken)
    monkeypatch.setattr(kernels, "kernel_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(kernels, "_cpu", {})
    monkeypatch.setenv("WORKBENCH_KERNELS", "1")
    layer = make_layer(24, 128, 64, "ternary")
    x = torch.randn(2, 128)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="pure-torch"):
            assert kernels.fused_matmul(layer, x) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert kernels.fused_matmul(layer, x) is None
            assert torch.equal(layer(x), kernels.reference_matmul(layer, x))
    assert kernels.available(build=False)["cpu"]["status"].startswith("error")


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build kernels/cpu/test_driver.cpp")
def test_cpp_driver_native(tmp_path):
    """The torch-free driver (also run for aarch64 under qemu, tests/bench/test_kernels_arm.py): every
    x86 path against its own double-precision reference."""
    exe = tmp_path / "driver"
    subprocess.run(["g++", "-O2", "-std=c++17", str(DRIVER), "-o", str(exe)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "FAIL" not in out.stdout and out.stdout.splitlines()[-1].startswith("0 of ")
    for name in INT_ISAS:  # every path this CPU has was checked
        if kernels.cpu_ops() is not None and kernels.cpu_ops().lowbit_set_int_isa(name) == name:
            assert f"{name} " in out.stdout and f"{name:<10s} not available" not in out.stdout, name
    if kernels.cpu_ops() is not None:
        kernels.cpu_ops().lowbit_set_int_isa("auto")
