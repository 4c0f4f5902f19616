"""`QuantLinear`: a drop-in `nn.Linear` holding packed low-bit weights, scales, zeros and LoRA adapters.

    y = x @ dequantize(packed, scale, zero).T + bias + (x @ lora_A.T @ lora_B.T) * lora_scaling

The pure-torch forward unpacks, dequantizes and multiplies. `workbench.quant.kernels` may supply a
fused unpack + matmul for the 2-bit block-64 layout (ternary and 2-bit), which `forward` uses when
one is available for the input's device and dtype.

Scales and zeros are float32 `nn.Parameter`s that hold float16-representable values (frozen by
default; recovery may train them and then calls `round_to_storage_`), so a save in float16 and a
reload give identical outputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from workbench.quant import kernels, packing
from workbench.quant.quantizers import QuantizedWeight, dequantize


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, kind: str, bits: int, group_size: int,
                 bias: bool = False, lora_rank: int = 0, lora_alpha: float | None = None):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.kind, self.bits, self.group_size = kind, bits, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, packing.packed_cols(in_features, bits),
                                                    dtype=torch.uint8))
        self.scale = nn.Parameter(torch.ones(out_features, groups), requires_grad=False)
        self.zero = None if kind == "ternary" else nn.Parameter(torch.zeros(out_features, groups), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.lora_rank = lora_rank
        self.lora_alpha = float(lora_alpha if lora_alpha is not None else lora_rank)
        if lora_rank:
            self.lora_A = nn.Parameter(torch.zeros(lora_rank, in_features))
            self.lora_B = nn.Parameter(torch.zeros(out_features, lora_rank))
        else:
            self.lora_A = self.lora_B = None
        self._codes: torch.Tensor | None = None  # unpacked codes, kept only while training
        self.keep_unpacked = False

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: torch.Tensor | None = None, lora_rank: int = 0,
                       lora_alpha: float | None = None) -> QuantLinear:
        out, inp = q.shape
        m = cls(inp, out, q.kind, q.bits, q.group_size, bias is not None, lora_rank, lora_alpha)
        m.load_quantized(q)
        if bias is not None:
            m.bias.data.copy_(bias.float())
        return m

    def load_quantized(self, q: QuantizedWeight) -> None:
        pad = 1 if q.kind == "ternary" else 0
        self.qweight.copy_(packing.pack_codes(q.codes, q.bits, pad))
        self.scale.data.copy_(q.scale.float())
        if self.zero is not None:
            self.zero.data.copy_(q.zero.float())
        self._codes = None

    def init_lora(self, method: str, weight: torch.Tensor | None = None, seed: int = 0) -> None:
        """``zeros``: A random, B zero (output unchanged). ``svd``: A, B from the top singular vectors
        of the quantization error `weight - dequantized`, as in LoftQ's first step."""
        if not self.lora_rank:
            return
        g = torch.Generator().manual_seed(seed)
        if method == "zeros":
            bound = 1.0 / math.sqrt(self.in_features)
            self.lora_A.data.uniform_(-bound, bound, generator=g)
            self.lora_B.data.zero_()
        elif method == "svd":
            if weight is None:
                raise ValueError("svd LoRA init needs the float weight")
            err = weight.float() - self.dequantized_weight(torch.float32)
            r = self.lora_rank
            torch.manual_seed(seed)  # svd_lowrank's random projection
            u, s, v = torch.svd_lowrank(err, q=min(r + 8, *err.shape), niter=4)
            root = s[:r].sqrt() / math.sqrt(self.scaling)
            self.lora_B.data.copy_(u[:, :r] * root)
            self.lora_A.data.copy_(root[:, None] * v[:, :r].t())
        else:
            raise ValueError(f"unknown LoRA init {method!r}; expected 'zeros' or 'svd'")

    # -- views ------------------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def codes(self) -> torch.Tensor:
        if self._codes is not None and self._codes.device == self.qweight.device:  # stale after a .to(device)
            return self._codes
        codes = packing.unpack_codes(self.qweight, self.bits, self.in_features)
        if self.keep_unpacked:
            self._codes = codes
        return codes

    def quantized(self) -> QuantizedWeight:
        zero = None if self.zero is None else self.zero.detach().half()
        return QuantizedWeight(self.kind, self.bits, self.group_size, self.codes(), self.scale.detach().half(), zero)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = QuantizedWeight(self.kind, self.bits, self.group_size, self.codes(), self.scale, self.zero)
        return dequantize(q, dtype=dtype)

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight with the adapters folded in: what `export --format hf` writes."""
        w = self.dequantized_weight(torch.float32)
        if self.lora_rank:
            w = w + (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return w.to(dtype)

    def round_to_storage_(self) -> None:
        """Round scales, zeros and adapters to float16 values, as they are saved."""
        with torch.no_grad():
            for p in (self.scale, self.zero, self.lora_A, self.lora_B):
                if p is not None:
                    p.copy_(p.half().float())
            self.scale.clamp_(min=6e-8)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = kernels.fused_matmul(self, x) if not torch.is_grad_enabled() else None
        y = fused if fused is not None else nn.functional.linear(x, self.dequantized_weight(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.lora_rank and not (fused is not None and kernels.fused_lora_add(self, x, y)):
            lora = (x @ self.lora_A.to(x.dtype).t()) @ self.lora_B.to(x.dtype).t()
            y = y + (lora if self.scaling == 1.0 else lora * self.scaling)
        return y

    def extra_repr(self) -> str:
        name = "ternary" if self.kind == "ternary" else f"{self.bits}-bit"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {name}, "
                f"group_size={self.group_size}, lora_rank={self.lora_rank}")
