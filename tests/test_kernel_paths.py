"""`kernels.kernel_path` / `unfused_layers` against the dispatch itself: for every layer format, a spy
in place of the compiled kernel tells whether `QuantLinear.forward` reaches it. Nothing is compiled."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from workbench.quant import kernels
from workbench.quant.linear import QuantLinear

IN_FEATURES = 768  # divisible by every group size below
GROUPS = [8, 16, 24, 32, 64, 128, 192, 256]
FORMATS = [("ternary", 2), ("asym", 1), ("asym", 2), ("asym", 3), ("asym", 4)]
COMBOS = [(kind, bits, g) for kind, bits in FORMATS for g in GROUPS]


class GemmSpy:
    """Stands in for lowbit_gemm: counts calls, returns zeros of the right shape."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x, qweight, scale, zero, group_size, k):
        self.calls += 1
        return torch.zeros(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)


def _fake_ops(spy: GemmSpy) -> SimpleNamespace:
    return SimpleNamespace(lowbit_gemm=SimpleNamespace(default=spy), lowbit_gemm_q8=SimpleNamespace(default=spy),
                           lowbit_gemm_q8w=SimpleNamespace(default=spy),
                           lowbit_lora_add=SimpleNamespace(default=lambda y, *a: y))


@pytest.fixture(params=["1", "exact"])
def cpu_spy(monkeypatch, request) -> GemmSpy:
    """The CPU kernel replaced by a spy, in the integer (default) and the float mode."""
    spy = GemmSpy()
    monkeypatch.setenv("WORKBENCH_KERNELS", request.param)
    monkeypatch.setenv("WORKBENCH_KERNELS_CROSSOVER", "16")  # 3-row inputs take the kernel; nothing measured
    monkeypatch.setattr(kernels, "_cpu", {})  # no cached op: the dispatch goes through cpu_ops()
    monkeypatch.setattr(kernels, "cpu_ops", lambda: _fake_ops(spy))
    return spy


def _forward(layer: QuantLinear, device: str = "cpu") -> None:
    with torch.no_grad():
        layer(torch.randn(1, 3, IN_FEATURES, device=device))  # decode-sized: 3 rows


@pytest.mark.parametrize("kind,bits,group", COMBOS)
def test_kernel_path_matches_the_cpu_dispatch(cpu_spy, kind, bits, group):
    layer = QuantLinear(IN_FEATURES, 8, kind, bits, group, lora_rank=2)
    _forward(layer)
    path = kernels.kernel_path(kind, bits, group, "cpu")
    assert (cpu_spy.calls > 0) == (path is not None), (kind, bits, group, path)
    assert path in (None, kernels.CPU_KERNEL)
    expected_unfused = {} if path else {"layer": kernels.layer_format(kind, bits, group)}
    assert kernels.unfused_layers({"layer": layer}) == expected_unfused


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind,bits,group", COMBOS)
def test_kernel_path_matches_the_cuda_dispatch(monkeypatch, kind, bits, group):
    spy = GemmSpy()
    monkeypatch.setenv("WORKBENCH_KERNELS", "1")
    monkeypatch.setattr(kernels, "triton_module", lambda: SimpleNamespace(lowbit_gemm=spy))
    layer = QuantLinear(IN_FEATURES, 8, kind, bits, group).cuda()
    _forward(layer, "cuda")
    path = kernels.kernel_path(kind, bits, group, "cuda")
    assert (spy.calls > 0) == (path is not None), (kind, bits, group, path)
    assert path in (None, kernels.TRITON_KERNEL)


def test_layer_format_and_other_devices():
    assert kernels.layer_format("ternary", 2, 64) == "ternary g64"
    assert kernels.layer_format("asym", 4, 256) == "4-bit g256"
    assert kernels.kernel_path("ternary", 2, 64, "cuda:0") == kernels.TRITON_KERNEL
    assert kernels.kernel_path("ternary", 2, 64, "meta") is None


def test_unfused_layers_of_a_mixed_model_and_its_saved_meta(tmp_path, cpu_spy):
    from conftest import save_tiny_model
    from transformers import AutoModelForCausalLM

    from workbench.quant.config import quant_config_from_dict
    from workbench.quant.model import quant_layers, quantize_model, save_quantized

    src = save_tiny_model(tmp_path / "src", "llama", num_layers=2)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    cfg = quant_config_from_dict({"bits": 1.58, "group_size": 16, "layers": [
        {"pattern": r"self_attn\.", "bits": 4}, {"pattern": r"mlp\.down_proj", "group_size": 32}]})
    quantize_model(model, cfg)
    unfused = kernels.unfused_layers(model)
    attn = {n for n in quant_layers(model) if ".self_attn." in n}
    assert set(unfused) == attn and set(unfused.values()) == {"4-bit g16"}
    assert kernels.kernel_paths(model) == {"4-bit g16": None, "ternary g16": kernels.CPU_KERNEL,
                                           "ternary g32": kernels.CPU_KERNEL}
    save_quantized(model, tmp_path / "q", src, cfg)
    meta = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert kernels.unfused_layers(meta["layers"]) == unfused
    with torch.no_grad():  # and the model agrees: one kernel call per fused layer in a decode step
        model(torch.tensor([[1, 5, 9]]))
    assert cpu_spy.calls == len(quant_layers(model)) - len(unfused)
