"""Fused low-bit kernels (`workbench.quant.kernels`) against the pure-torch dequantize + matmul: the
float kernels (``WORKBENCH_KERNELS=exact``, set for every test here) and the exact dequantization
above `MAX_ROWS` rows. The integer kernels (the default mode) are in test_kernels_int8.py.

The CPU extension compiles on first use into the workbench home (about a minute on 2 cores, once);
every ISA path this CPU has (avx512bf16, avx512, avx2, scalar) is checked. The Triton kernels run
on CPU tensors under ``TRITON_INTERPRET=1`` in every run (tests/test_triton_interpreted.py, in a fresh
process; triton is in the dev extra), and on CUDA when there is a device.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from workbench.quant import kernels
from workbench.quant.linear import QuantLinear
from workbench.quant.quantizers import quantize_weight

ISAS = ["avx512bf16", "avx512", "avx2", "scalar"]
# (N, K, group sizes): K not a multiple of 64, odd block counts, groups below/at/above a block
SHAPES = [
    (37, 96, [8, 16, 32, 48]),
    (64, 200, [8, 40]),
    (5, 80, [16]),
    (70, 576, [16, 32, 64, 192]),
    (9, 1024, [64, 128, 256]),
    (130, 256, [8, 128, 256]),
]
CASES = [(n, k, g) for n, k, gs in SHAPES for g in gs]
BATCHES = [1, 2, 5, 16]
KINDS = {"asym": 2, "ternary": 1.58}


def make_layer(n: int, k: int, group: int, kind: str, seed: int = 0, bias: bool = False) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    method = "rtn" if kind == "asym" else "absmean"
    b = torch.randn(n, generator=g) if bias else None
    return QuantLinear.from_quantized(quantize_weight(w, KINDS[kind], group, method), bias=b)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


@pytest.fixture(autouse=True)
def exact_mode(monkeypatch):
    monkeypatch.setenv("WORKBENCH_KERNELS", "exact")


@pytest.fixture(scope="module")
def ops():
    ops = kernels.cpu_ops()
    if ops is None:
        pytest.skip(f"the CPU kernels could not be built: {kernels.available(build=False)}")
    yield ops
    ops.lowbit_set_isa("auto")


@pytest.fixture(params=ISAS)
def isa(request, ops):
    got = ops.lowbit_set_isa(request.param)
    if got != request.param:
        ops.lowbit_set_isa("auto")
        pytest.skip(f"this CPU has no {request.param} (best: {got})")
    yield got
    ops.lowbit_set_isa("auto")


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n,k,group", CASES)
def test_cpu_kernel_matches_reference(isa, n, k, group, kind):
    layer = make_layer(n, k, group, kind, seed=n + k + group)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for batch in BATCHES:
            x = torch.randn(batch, k, generator=g)
            y = kernels.fused_matmul(layer, x)
            assert y is not None and y.shape == (batch, n) and y.dtype == torch.float32
            assert rel_err(y, kernels.reference_matmul(layer, x)) < 1e-5, (isa, batch)

            xb = x.bfloat16()
            yb = kernels.fused_matmul(layer, xb)
            assert yb is not None and yb.dtype == torch.bfloat16
            # the kernel multiplies in fp32 and rounds once: close to the fp32 product of the bf16 input
            assert rel_err(yb, kernels.reference_matmul(layer, xb.float())) < 5e-3, (isa, batch)
            assert rel_err(yb, kernels.reference_matmul(layer, xb)) < 2e-2, (isa, batch)


def test_quant_linear_uses_kernel_with_leading_dims_bias_and_lora(ops):
    layer = make_layer(48, 128, 64, "asym", bias=True)
    layer2 = QuantLinear(128, 48, "asym", 2, 64, bias=True, lora_rank=4)
    layer2.load_state_dict(layer.state_dict(), strict=False)
    layer2.init_lora("zeros")
    layer2.lora_B.data.normal_()
    x = torch.randn(2, 3, 128)
    for m in (layer, layer2):
        expected = m(x)  # grad enabled: the pure-torch path
        with torch.no_grad():
            assert kernels.fused_matmul(m, x) is not None
            got = m(x)
        assert got.shape == (2, 3, 48)
        assert rel_err(got, expected) < 1e-5


def test_noncontiguous_input_and_bf16_scales(ops):
    layer = make_layer(33, 192, 64, "ternary")
    x = torch.randn(192, 4).t()  # a transposed view
    with torch.no_grad():
        assert rel_err(kernels.fused_matmul(layer, x), kernels.reference_matmul(layer, x)) < 1e-5
        layer.to(torch.bfloat16)  # scales become bf16 parameters; the kernel takes float32 copies
        assert rel_err(kernels.fused_matmul(layer, x), kernels.reference_matmul(layer, x)) < 1e-5


@pytest.mark.parametrize("mode", ["exact", "1"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_above_max_rows_gives_the_pure_torch_result_exactly(ops, monkeypatch, mode, kind, dtype):
    monkeypatch.setenv("WORKBENCH_KERNELS", mode)
    for n, k, group in [(70, 576, 16), (33, 200, 40), (48, 128, 64)]:
        layer = make_layer(n, k, group, kind)
        x = torch.randn(kernels.MAX_ROWS + 7, k).to(dtype)
        with torch.no_grad():
            y = kernels.fused_matmul(layer, x)
            assert y is not None and torch.equal(y, kernels.reference_matmul(layer, x)), (n, k, group)
            assert torch.equal(kernels.dequantized(layer, dtype), layer.dequantized_weight(dtype))


def test_declines_what_it_does_not_cover(ops):
    layer = make_layer(16, 64, 32, "asym")
    with torch.no_grad():
        assert kernels.fused_matmul(layer, torch.randn(kernels.MAX_ROWS, 64)) is not None
        assert kernels.fused_matmul(layer, torch.randn(0, 64)) is None
        assert kernels.fused_matmul(layer, torch.randn(1, 64).half()) is None
        four_bit = QuantLinear.from_quantized(quantize_weight(torch.randn(16, 64), 4, 32, "rtn"))
        assert kernels.fused_matmul(four_bit, torch.randn(1, 64)) is None


def test_disabled_by_env_gives_the_reference(monkeypatch):
    layer = make_layer(40, 192, 64, "asym")
    x = torch.randn(3, 192)
    monkeypatch.setenv("WORKBENCH_KERNELS", "0")
    with torch.no_grad():
        assert kernels.fused_matmul(layer, x) is None
        assert torch.equal(layer(x), kernels.reference_matmul(layer, x))
    assert kernels.available(build=False)["enabled"] is False


def test_build_failure_falls_back_once(monkeypatch):
    def broken_build():
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(kernels, "_cpu", {})  # as in a fresh process
    monkeypatch.setattr(kernels, "_build_cpu", broken_build)
    monkeypatch.setenv("WORKBENCH_KERNELS", "1")
    layer = make_layer(24, 128, 64, "ternary")
    x = torch.randn(2, 128)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="pure-torch"):
            assert kernels.fused_matmul(layer, x) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # reported once only
            assert kernels.fused_matmul(layer, x) is None
            assert torch.equal(layer(x), kernels.reference_matmul(layer, x))
    assert kernels.available()["cpu"]["status"].startswith("error: RuntimeError")


def test_available_reports_cpu(ops):
    status = kernels.available()
    assert status["enabled"] and status["cpu"]["status"] == "ready"
    assert status["cpu"]["isa"] in ISAS
    assert "triton" in status


def test_no_triton_import_on_cpu(ops):
    import sys

    with torch.no_grad():
        kernels.fused_matmul(make_layer(8, 64, 64, "asym"), torch.randn(1, 64))
    if not torch.cuda.is_available():
        assert "workbench_triton_lowbit" not in sys.modules


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need a CUDA device")


@cuda
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("n,k,group", [(37, 96, 16), (64, 200, 8), (70, 576, 64), (300, 1024, 128), (512, 4096, 64)])
def test_triton_kernel_matches_reference(n, k, group, kind):
    if kernels.triton_module() is None:
        pytest.skip(f"triton unavailable: {kernels.available()['triton']}")
    layer = make_layer(n, k, group, kind).cuda()
    with torch.no_grad():
        for batch in (1, 2, 5, 16, 64):
            x = torch.randn(batch, k, device="cuda")
            y = kernels.fused_matmul(layer, x)
            assert y is not None and y.shape == (batch, n) and y.dtype == torch.float32
            assert rel_err(y, kernels.reference_matmul(layer, x)) < 1e-5, batch
            for dt in (torch.bfloat16, torch.float16):
                xh = x.to(dt)
                yh = kernels.fused_matmul(layer, xh)
                assert yh.dtype == dt
                assert rel_err(yh, kernels.reference_matmul(layer, xh.float())) < 1e-2, (batch, dt)


# -- the Triton kernels under the interpreter, on CPU tensors (every run) -----------------------------

@pytest.mark.timeout(300)
def test_triton_kernels_under_the_interpreter():
    """tests/test_triton_interpreted.py in a fresh process with TRITON_INTERPRET=1: the interpreter
    works only when triton is first imported in that mode, and torch._dynamo imports triton as soon as
    any test touches it (the interpreted tests skip in this process)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e '.[dev]' installs it)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:warnings",
           str(Path(__file__).with_name("test_triton_interpreted.py"))]
    out = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=280)
    tail = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0, tail
    assert re.search(r"\b\d+ passed", tail) and "skipped" not in tail, tail


def test_a_triton_launch_failure_falls_back_once(monkeypatch):
    def failing(*args):
        raise RuntimeError("triton.runtime.errors.OutOfResources: out of resource: shared memory")

    monkeypatch.setattr(kernels, "_triton", {"module": SimpleNamespace(lowbit_gemm=failing)})
    layer = make_layer(24, 128, 64, "ternary")
    x = torch.randn(2, 128)
    with pytest.warns(RuntimeWarning, match="Triton kernels are unavailable.*pure-torch"):
        assert kernels.triton_matmul(layer, x) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once; not tried again
        assert kernels.triton_matmul(layer, x) is None
    assert "module" not in kernels._triton and isinstance(kernels._triton["error"], RuntimeError)


@pytest.mark.parametrize("bits", [1.58, 2])
def test_greedy_decoding_with_kernels_gives_the_pure_torch_tokens(ops, tmp_path, monkeypatch, bits):
    from conftest import save_tiny_model
    from transformers import AutoModelForCausalLM

    from workbench.quant.config import quant_config_from_dict
    from workbench.quant.model import quantize_model

    src = save_tiny_model(tmp_path / "m", "llama", num_layers=2)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    quantize_model(model, quant_config_from_dict({"bits": bits, "group_size": 16, "lora": {"rank": 2}}))
    prompt = torch.tensor([[1, 5, 9, 13, 17]])
    runs = {}
    for flag in ("exact", "0"):
        monkeypatch.setenv("WORKBENCH_KERNELS", flag)
        with torch.no_grad():
            runs[flag] = model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(runs["exact"], runs["0"])
