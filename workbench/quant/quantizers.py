"""Weight quantizers: plain functions from a float weight [out, in] to codes, scales and zeros.

Two kinds, both grouped along the input dimension (see `packing.py`):

* ``ternary`` (1.58-bit, BitNet b1.58): value = (code - 1) * scale, code in {0, 1, 2}, one float16
  scale per group. ``absmean`` sets the scale to the group's mean |w|; ``lsq`` then alternates
  rounding and the least-squares scale <w, t> / <t, t>, which never increases the squared error.
* ``asym`` (1..4 bits): value = (code - zero) * scale with a float16 scale and zero per group.
  ``rtn`` is min/max round-to-nearest; ``hqq`` keeps the min/max scale and solves for the zero by
  half-quadratic splitting under an l_p (p < 1) error, with the `hqq` package's own solver step
  (Badri & Shaji, 2023). Ternary stays ours: hqq has no symmetric {-1, 0, 1} format.

Every solve runs on the weight's device (pass a CUDA tensor to solve there) in float32, and the
result comes back on that device; callers move it where they keep it.

The returned scale and zero are already rounded to float16 and the codes are computed with those
rounded values, so `dequantize` reproduces exactly what every consumer (kernels, GGUF) sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TERNARY_METHODS = ("absmean", "lsq")
ASYM_METHODS = ("rtn", "hqq")


@dataclass
class QuantizedWeight:
    kind: str  # "ternary" | "asym"
    bits: int  # bits per code: 2 for ternary, 1..4 for asym
    group_size: int
    codes: torch.Tensor  # [out, in] uint8
    scale: torch.Tensor  # [out, in // group_size] float16
    zero: torch.Tensor | None  # [out, in // group_size] float16, None for ternary

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same codes, scales and zeros on `device`."""
        zero = None if self.zero is None else self.zero.to(device)
        return QuantizedWeight(self.kind, self.bits, self.group_size, self.codes.to(device), self.scale.to(device), zero)


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out, inp = w.shape
    if group_size <= 0 or inp % group_size:
        raise ValueError(f"group_size {group_size} does not divide the row length {inp}")
    return w.float().reshape(out, inp // group_size, group_size)


def quantize_ternary(w: torch.Tensor, group_size: int, method: str = "lsq", iters: int = 10) -> QuantizedWeight:
    """Symmetric {-1, 0, +1} x scale per group."""
    if method not in TERNARY_METHODS:
        raise ValueError(f"ternary method must be one of {TERNARY_METHODS}, got {method!r}")
    g = _groups(w, group_size)
    scale = g.abs().mean(-1, keepdim=True).clamp_min(1e-8)
    if method == "lsq":
        for _ in range(iters):
            t = (g / scale).round().clamp(-1, 1)
            tt = (t * t).sum(-1, keepdim=True)
            scale = torch.where(tt > 0, (g * t).sum(-1, keepdim=True) / tt.clamp_min(1), scale).clamp_min(1e-8)
    scale = scale.half().float().clamp_min(6e-8)  # smallest positive float16 subnormal
    t = (g / scale).round().clamp(-1, 1)
    codes = (t + 1).to(torch.uint8).reshape(w.shape)
    return QuantizedWeight("ternary", 2, group_size, codes, scale.squeeze(-1).half(), None)


HQQ_PARAMS = {"lp_norm": 0.7, "beta": 1e1, "iters": 20}  # hqq's optimize_weights_proximal defaults


def hqq_scale_zero(g: torch.Tensor, max_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's min/max start and half-quadratic zero solve for groups `g` [..., group], on `g`'s
    device; returns (scale, zero) in float32, before rounding.

    The loop is `hqq.core.optimize.optimize_weights_proximal` (its defaults: l_p 0.7, beta 10, 20
    iterations, stop when the error stops falling) around the package's own step, in float32 on
    every device: hqq itself switches to float16 on CUDA, which would make the saved zeros depend on
    the device. On the CPU this is hqq's function, bit for bit (tests/test_devices.py checks it)."""
    from hqq.core.optimize import optimize_weights_proximal_legacy_step as step

    rows = g.reshape(-1, g.shape[-1]).float()
    lo, hi = rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True)
    # As hqq's Quantizer.quantize: inverse scale, 1 for a (nearly) constant group, capped for float16.
    inv = torch.where((hi - lo).abs() <= 1e-4, torch.ones_like(lo), max_code / (hi - lo)).clamp(max=2e4)
    zero = -lo * inv
    best = torch.tensor(torch.inf, device=rows.device)
    with torch.inference_mode():
        for _ in range(HQQ_PARAMS["iters"]):
            w_r, _, zero, inv = step(rows, inv, zero, [0, max_code], HQQ_PARAMS["beta"], HQQ_PARAMS["lp_norm"], 1)
            error = (rows - w_r).abs().mean()
            if not error < best:
                break
            best = error
    shape = (*g.shape[:-1], 1)
    return (1.0 / inv).reshape(shape).clone(), zero.reshape(shape).clone()


def quantize_asym(w: torch.Tensor, bits: int, group_size: int, method: str = "hqq") -> QuantizedWeight:
    """Asymmetric `bits`-bit codes with a float16 scale and zero per group."""
    if bits not in (1, 2, 3, 4):
        raise ValueError(f"asymmetric quantization supports 1, 2, 3 or 4 bits, got {bits}")
    if method not in ASYM_METHODS:
        raise ValueError(f"asymmetric method must be one of {ASYM_METHODS}, got {method!r}")
    g = _groups(w, group_size)
    max_code = (1 << bits) - 1
    if method == "hqq":
        scale, zero = hqq_scale_zero(g, max_code)
    else:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / max_code).clamp_min(1e-8)
        zero = -lo / scale
    scale = scale.half().float().clamp_min(6e-8)
    zero = zero.half().float()
    codes = (g / scale + zero).round().clamp(0, max_code).to(torch.uint8).reshape(w.shape)
    return QuantizedWeight("asym", bits, group_size, codes, scale.squeeze(-1).half(), zero.squeeze(-1).half())


def quantize_weight(w: torch.Tensor, bits: float | str, group_size: int, method: str | None = None) -> QuantizedWeight:
    """Dispatch on `bits`: 1.58 (or "ternary") is ternary, 1..4 is asymmetric."""
    if bits in (1.58, "1.58", "ternary"):
        return quantize_ternary(w, group_size, method or "lsq")
    return quantize_asym(w, int(bits), group_size, method or "hqq")


def dequantize(q: QuantizedWeight, codes: torch.Tensor | None = None, scale: torch.Tensor | None = None,
               zero: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(code - zero) * scale per group, in `dtype`. Overrides let training pass trainable scales."""
    codes = q.codes if codes is None else codes
    scale = q.scale if scale is None else scale
    zero = q.zero if zero is None else zero
    out, inp = codes.shape
    c = codes.reshape(out, inp // q.group_size, q.group_size).to(dtype)
    z = 1.0 if q.kind == "ternary" else zero.to(dtype).unsqueeze(-1)
    return ((c - z) * scale.to(dtype).unsqueeze(-1)).reshape(out, inp)


def bits_per_weight(kind: str, bits: int, group_size: int, storage: str = "packed") -> float:
    """Bits on disk per weight, scales and zeros included (float16 each)."""
    code_bits = 1.6 if (kind == "ternary" and storage == "trits") else float(bits)
    meta = 16 if kind == "ternary" else 32
    return code_bits + meta / group_size
