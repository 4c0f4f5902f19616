"""The Triton kernels (kernels/triton/lowbit.py) under triton's interpreter, on CPU tensors.

Runs only with ``TRITON_INTERPRET=1`` set when the process starts (triton must be imported in that
mode): tests/test_kernels.py runs this file so in a fresh process in every test run; by hand:
``TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_triton_interpreted.py``.

2-bit and ternary, the GEMV (up to 4 rows) and GEMM kernels, float32/float16/bfloat16. The bfloat16
GEMM takes its dot in float32 here (``DOT_F32``, from the same bfloat16-rounded operands: the
products are exact either way), because triton 3.9's interpreter keeps bfloat16 as raw uint16 and
its tl.dot multiplies those integers; the GPU's bfloat16 dot itself is checked on CUDA only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import pytest
import torch

from workbench.quant import kernels
from workbench.quant.linear import QuantLinear
from workbench.quant.quantizers import quantize_weight

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs TRITON_INTERPRET=1 from the start: test_kernels.py runs this file so"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]

KINDS = {"asym": 2, "ternary": 1.58}
# (N, K, group): power-of-two groups (the grouped GEMV), a group not a power of two and K not a multiple
# of 64 (the per-weight GEMV); N never a multiple of the blocks
CASES = [(37, 192, 64), (24, 160, 40), (20, 128, 32)]
# rows 1 and 3: the GEMV kernel (up to GEMV_MAX_ROWS); 17: the GEMM kernel over two row blocks
BATCHES = [1, 3, 17]
# relative error bounds: float32 sums; 16-bit: the output's rounding (2**-11, 2**-8) dominates
BOUNDS = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module")
def lowbit():
    return kernels._import_triton()


def make_layer(n: int, k: int, group: int, kind: str, seed: int = 0) -> QuantLinear:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return QuantLinear.from_quantized(quantize_weight(w, KINDS[kind], group, "rtn" if kind == "asym" else "absmean"))


def reference(layer: QuantLinear, x: torch.Tensor, gemm: bool) -> torch.Tensor:
    """x @ W.T in float64; the 16-bit GEMM multiplies by W rounded to x's dtype (as on the GPU)."""
    w = layer.dequantized_weight(torch.float32)
    if gemm and x.dtype != torch.float32:
        w = w.to(x.dtype)
    return x.double() @ w.double().T


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def test_the_kernels_are_interpreted(lowbit):
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(lowbit._gemv_kernel, InterpretedFunction) and isinstance(lowbit._gemm_kernel, InterpretedFunction)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n,k,group", CASES)
def test_kernels_match_reference(lowbit, n, k, group, kind):
    layer = make_layer(n, k, group, kind, seed=n + k)
    scale, zero = layer.scale, getattr(layer, "zero", None)
    assert (zero is None) == (kind == "ternary")
    g = torch.Generator().manual_seed(2)
    for batch in BATCHES:
        for dt, bound in BOUNDS.items():
            x = torch.randn(batch, k, generator=g).to(dt)
            y = lowbit.lowbit_gemm(x, layer.qweight, scale, zero, group, k)
            assert y.shape == (batch, n) and y.dtype == dt
            assert rel_err(y, reference(layer, x, batch > lowbit.GEMV_MAX_ROWS)) < bound, (batch, dt)


def test_dispatch_gives_the_reference(lowbit, monkeypatch):
    """`kernels.triton_matmul` (the CUDA branch of `fused_matmul`) with the interpreted module."""
    monkeypatch.setattr(kernels, "_triton", {"module": lowbit})
    layer = make_layer(40, 192, 64, "asym")
    x = torch.randn(5, 192)
    with torch.no_grad():
        y = kernels.triton_matmul(layer, x)
    assert y is not None and rel_err(y, reference(layer, x, True)) < 1e-6


def test_launches_run_on_the_inputs_device(lowbit, monkeypatch):
    seen = []
    real = lowbit.device_guard
    monkeypatch.setattr(lowbit, "device_guard", lambda d: seen.append(d) or real(d))
    layer = make_layer(16, 64, 64, "ternary")
    for batch in (2, 9):  # GEMV and GEMM
        lowbit.lowbit_gemm(torch.randn(batch, 64), layer.qweight, layer.scale, None, 64, 64)
    assert seen == [torch.device("cpu")] * 2
    guard = real(torch.device("cuda", 1))  # constructed only: entering it needs that GPU
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(real(torch.device("cpu")), contextlib.nullcontext)
