"""Packing, quantizers, QuantLinear and the quantization config, against direct references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.quant import packing
from workbench.quant.config import (
    QuantConfigError,
    check_model,
    load_quant_config,
    quant_config_from_dict,
)
from workbench.quant.linear import QuantLinear
from workbench.quant.quantizers import (
    bits_per_weight,
    dequantize,
    quantize_asym,
    quantize_ternary,
    quantize_weight,
)


@pytest.mark.parametrize("cols", [1, 5, 16, 63, 64, 65, 96, 130, 257])
def test_pack_2bit_round_trip_and_layout(cols):
    g = torch.Generator().manual_seed(cols)
    codes = torch.randint(0, 4, (3, cols), generator=g, dtype=torch.uint8)
    packed = packing.pack_2bit(codes)
    assert packed.shape == (3, packing.packed_cols(cols, 2)) and packed.dtype == torch.uint8
    assert torch.equal(packing.unpack_2bit(packed, cols), codes)
    # The documented layout, decoded byte by byte: byte m of block b holds 64b+m+16j at shift 2j.
    padded = torch.nn.functional.pad(codes, (0, packed.shape[1] * 4 - cols))
    for b in range(packed.shape[1] // 16):
        for m in range(16):
            byte = int(packed[1, b * 16 + m])
            for j in range(4):
                assert (byte >> (2 * j)) & 3 == int(padded[1, 64 * b + m + 16 * j])


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 7, 8, 33, 100])
def test_pack_bits_round_trip(bits, cols):
    g = torch.Generator().manual_seed(bits * 100 + cols)
    codes = torch.randint(0, 1 << bits, (4, cols), generator=g).to(torch.uint8)
    packed = packing.pack_bits(codes, bits)
    assert packed.shape == (4, -(-cols // 8) * bits)
    assert torch.equal(packing.unpack_bits(packed, bits, cols), codes)
    # Reference: numpy's bit stream of the codes, little-endian within each code.
    stream = np.zeros((4, packed.shape[1] * 8), dtype=np.uint8)
    for i in range(cols):
        for k in range(bits):
            stream[:, i * bits + k] = (codes[:, i].numpy() >> k) & 1
    assert np.array_equal(np.packbits(stream, axis=1, bitorder="little"), packed.numpy())


@pytest.mark.parametrize("cols", [1, 4, 5, 6, 99, 250])
def test_trits_round_trip_at_1_6_bits(cols):
    codes = torch.randint(0, 3, (2, cols), generator=torch.Generator().manual_seed(cols)).to(torch.uint8)
    packed = packing.pack_trits(codes)
    assert packed.shape == (2, -(-cols // 5))
    assert torch.equal(packing.unpack_trits(packed, cols), codes)
    assert int(packed.max()) < 243


def _ref_groups(w: torch.Tensor, g: int) -> np.ndarray:
    return w.double().numpy().reshape(w.shape[0], -1, g)


@pytest.mark.parametrize("group", [8, 16, 24, 48, 96])
def test_ternary_absmean_matches_direct_reference_and_is_exactly_ternary(group):
    w = torch.randn(5, 96, generator=torch.Generator().manual_seed(group))
    q = quantize_ternary(w, group, "absmean")
    ref = _ref_groups(w, group)
    scale = np.abs(ref).mean(-1).astype(np.float16).astype(np.float64)
    assert np.array_equal(q.scale.numpy(), scale.astype(np.float16))
    t = np.clip(np.round(ref / scale[..., None]), -1, 1)
    deq = dequantize(q).double().numpy().reshape(ref.shape)
    assert np.allclose(deq, t * scale[..., None])
    ratio = deq / scale[..., None]
    assert set(np.unique(ratio)) <= {-1.0, 0.0, 1.0}


def test_ternary_lsq_never_worse_than_absmean():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) ** 3
    for group in (16, 64, 256):
        e_abs = (dequantize(quantize_ternary(w, group, "absmean")) - w).pow(2).sum()
        e_lsq = (dequantize(quantize_ternary(w, group, "lsq")) - w).pow(2).sum()
        assert e_lsq <= e_abs * 1.001


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_asym_rtn_matches_direct_reference(bits):
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(bits))
    q = quantize_asym(w, bits, 16, "rtn")
    ref = _ref_groups(w, 16)
    lo, hi = ref.min(-1), ref.max(-1)
    scale = np.float16((hi - lo) / (2 ** bits - 1)).astype(np.float64)
    zero = np.float16(-lo / ((hi - lo) / (2 ** bits - 1))).astype(np.float64)
    codes = np.clip(np.round(ref / scale[..., None] + zero[..., None]), 0, 2 ** bits - 1)
    assert np.array_equal(q.codes.numpy().reshape(codes.shape), codes.astype(np.uint8))
    deq = dequantize(q).double().numpy().reshape(ref.shape)
    assert np.allclose(deq, (codes - zero[..., None]) * scale[..., None], atol=1e-6)
    # Round-to-nearest error is at most half a step (plus float16 rounding of scale and zero).
    assert np.all(np.abs(deq - ref) <= scale[..., None] * 0.51 + 1e-3)


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 32), (4, 64), (2, 128)])
def test_hqq_codes_equal_the_hqq_packages_quantizer(bits, group):
    """Our 2-4 bit `hqq` method is hqq's own solve (Quantizer.quantize, axis 1, optimize on): with its
    scale and zero rounded to float16, as we store them, its codes are ours exactly; before that
    rounding, hqq's own codes agree on nearly every weight."""
    hqq_quantize = pytest.importorskip("hqq.core.quantize")
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(bits)) * 0.02
    w[3, :group] = 0.01  # a constant group: hqq's unit scale path
    ours = quantize_asym(w, bits, group, "hqq")
    w_q, meta = hqq_quantize.Quantizer.quantize(w, nbits=bits, group_size=group, axis=1, bitpack=False,
                                                device="cpu")
    scale = meta["scale"].reshape(48, -1, 1).half().float().clamp_min(6e-8)
    zero = meta["zero"].reshape(48, -1, 1).half().float()
    g = w.reshape(48, -1, group)
    expected = (g / scale + zero).round().clamp(0, 2 ** bits - 1).to(torch.uint8).reshape(w.shape)
    assert torch.equal(ours.codes, expected)
    assert torch.equal(ours.scale, scale.squeeze(-1).half()) and torch.equal(ours.zero, zero.squeeze(-1).half())
    assert (ours.codes == w_q.reshape(w.shape).to(torch.uint8)).float().mean() > 0.99


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_lowers_l1_error_of_rtn(bits):
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(7)) * torch.rand(128, 1)
    err = {m: (dequantize(quantize_asym(w, bits, 64, m)) - w).abs().mean().item() for m in ("rtn", "hqq")}
    assert err["hqq"] < err["rtn"]


def test_bits_per_weight_counts_scales_and_zeros():
    assert bits_per_weight("asym", 2, 64) == 2.5
    assert bits_per_weight("ternary", 2, 64) == 2.25
    assert bits_per_weight("ternary", 2, 256, "trits") == pytest.approx(1.6625)


@pytest.mark.parametrize("kind_bits", [1.58, 1, 2, 3, 4])
@pytest.mark.parametrize("group", [8, 16, 40])
def test_quantlinear_forward_equals_dequantize_then_matmul(kind_bits, group, monkeypatch):
    monkeypatch.setenv("WORKBENCH_KERNELS", "exact")  # the default int8 path is within kernels.INT8_ERROR_BOUND, not 1e-4
    g = torch.Generator().manual_seed(group)
    w, bias = torch.randn(24, 80, generator=g), torch.randn(24, generator=g)
    q = quantize_weight(w, kind_bits, group)
    layer = QuantLinear.from_quantized(q, bias, lora_rank=3, lora_alpha=6)
    layer.init_lora("zeros", seed=0)
    layer.lora_B.data.normal_(generator=g)
    x = torch.randn(2, 5, 80, generator=g)
    with torch.no_grad():
        y = layer(x)
    w_deq = dequantize(q)  # independent of the packed buffer: straight from the quantizer's codes
    ref = x @ w_deq.t() + bias + (x @ layer.lora_A.t() @ layer.lora_B.t()) * 2.0
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(layer.codes(), q.codes)


def test_svd_lora_init_reduces_the_quantization_error():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    layer = QuantLinear.from_quantized(quantize_weight(w, 2, 64), lora_rank=16)
    before = (layer.dequantized_weight() - w).norm()
    layer.init_lora("svd", w, seed=0)
    after = (layer.merged_weight() - w).norm()
    assert after < before * 0.95


def test_config_errors_name_file_line_and_field(tmp_path):
    p = tmp_path / "q.yml"
    p.write_text("bits: 2\ngroup_size: 64\nlora:\n  rank: 4\n  colour: red\n")
    with pytest.raises(QuantConfigError, match=r"q.yml:5: lora.colour: unknown key"):
        load_quant_config(p)
    p.write_text("bits: 5\n")
    with pytest.raises(QuantConfigError, match=r"q.yml:1: bits: unknown bits 5"):
        load_quant_config(p)
    p.write_text("bits: ternary\nmethod: hqq\n")
    with pytest.raises(QuantConfigError, match=r"method: unknown method 'hqq' for ternary"):
        load_quant_config(p)
    p.write_text("bits: 2\nlayers:\n  - {pattern: 'mlp', bits: 7}\n")
    with pytest.raises(QuantConfigError, match=r"q.yml:3: layers.0.bits"):
        load_quant_config(p)
    p.write_text("bits: 2\nlayers:\n  - {pattern: 'mlp', bits: 4}\n  - {pattern: 'attn', rank: -1}\n")
    with pytest.raises(QuantConfigError, match=r"q.yml:4: layers.1.rank: expected a non-negative integer"):
        load_quant_config(p)


def test_group_size_not_dividing_a_row_is_refused_naming_every_tensor():
    cfg = quant_config_from_dict({"bits": 2, "group_size": 48})
    with pytest.raises(QuantConfigError) as e:
        check_model(cfg, {"a.q_proj": (32, 96), "a.down_proj": (32, 64), "b.down_proj": (32, 64)})
    msg = str(e.value)
    assert "a.down_proj.weight [32, 64]" in msg and "b.down_proj.weight" in msg and "a.q_proj" not in msg


def test_mixed_config_resolves_per_layer():
    cfg = quant_config_from_dict({"bits": 1.58, "group_size": 64, "skip": ["lm_head"],
                                  "layers": [{"pattern": r"self_attn\.", "bits": 4},
                                             {"pattern": r"layers\.0\.mlp", "skip": True}]})
    assert cfg.setting_for("model.layers.3.mlp.up_proj").kind == "ternary"
    attn = cfg.setting_for("model.layers.3.self_attn.q_proj")
    assert (attn.kind, attn.bits, attn.method) == ("asym", 4, "hqq")
    assert cfg.setting_for("model.layers.0.mlp.up_proj") is None
    assert cfg.setting_for("lm_head") is None


def test_per_layer_rank_overrides_the_adapter_rank():
    cfg = quant_config_from_dict({"bits": 2, "lora": {"rank": 8},
                                  "layers": [{"pattern": r"mlp\.up_proj", "rank": 32}, {"pattern": "q_proj", "rank": 0}]})
    assert [cfg.setting_for(f"model.layers.1.{n}").rank for n in ("mlp.up_proj", "self_attn.q_proj", "mlp.down_proj")] \
        == [32, 0, 8]


def test_example_configs_load():
    from pathlib import Path

    for name in ("2bit.yml", "ternary.yml", "mixed-2bit-4bit.yml", "mixed-ternary.yml"):
        cfg = load_quant_config(Path(__file__).parents[1] / "recipes" / name)
        assert cfg.lora.rank > 0
