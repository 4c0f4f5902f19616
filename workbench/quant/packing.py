"""Bit packing of quantization codes: the one layout shared by `QuantLinear`, the kernels and the exports.

A weight W has shape [out_features, in_features]. Quantization groups run along a row (the input
dimension): group g of row r is W[r, g*G:(g+1)*G]. Each weight becomes an unsigned integer code.

* 2-bit codes (2-bit asymmetric and ternary) use the **block-64 layout** (GGUF TQ2_0's interleave,
  at a quarter of its block): each row is padded to a multiple of 64 codes; block b of a row (codes
  64b .. 64b+63) becomes 16 bytes, and byte m of the block holds the codes of elements m, m+16,
  m+32, m+48 at bit shifts 0, 2, 4, 6. Packed shape [out_features, K_pad // 4], uint8. One 16-byte
  load thus yields four runs of 16 consecutive codes (one AVX-512 or two AVX2 float vectors each).
  Block 64 divides the hidden sizes of small models (576 = 9 x 64), so they need no padding.
* 1-, 3- and 4-bit codes use a plain little-endian bit stream: each run of 8 codes fills `bits` bytes,
  code i at bit offset i*bits. Rows are padded to a multiple of 8 codes.
* Ternary codes can also be stored at 1.6 bits per value (5 trits per byte, byte = sum c_i * 3**i),
  rows padded to a multiple of 5; this is a storage format, unpacked to the block-64 layout on load.

Padding codes are `pad` (ternary uses 1, whose value is 0); unpacking returns exactly `in_features`
codes per row.
"""

from __future__ import annotations

import torch

BLOCK = 64  # codes per 2-bit block
RUN = BLOCK // 4  # consecutive codes per bit shift; also bytes per block


def _pad_cols(codes: torch.Tensor, multiple: int, pad: int) -> torch.Tensor:
    cols = codes.shape[-1]
    extra = (-cols) % multiple
    if extra == 0:
        return codes
    return torch.nn.functional.pad(codes, (0, extra), value=pad)


def pack_2bit(codes: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """[rows, cols] codes in 0..3 -> [rows, ceil(cols/64)*16] uint8 in the block-64 layout."""
    c = _pad_cols(codes.to(torch.uint8), BLOCK, pad)
    rows, cols = c.shape
    c = c.view(rows, cols // BLOCK, 4, RUN)  # [r, block, quarter, m] = element quarter*RUN + m
    packed = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
    return packed.reshape(rows, cols // 4)


def unpack_2bit(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of `pack_2bit`: [rows, cols] uint8 codes."""
    rows, nbytes = packed.shape
    p = packed.view(rows, nbytes // RUN, 1, RUN)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(1, 1, 4, 1)
    c = (p >> shifts) & 3
    return c.reshape(rows, nbytes * 4)[:, :cols]


def pack_bits(codes: torch.Tensor, bits: int, pad: int = 0) -> torch.Tensor:
    """[rows, cols] codes < 2**bits -> [rows, ceil(cols/8)*bits] uint8, a little-endian bit stream."""
    if bits not in (1, 2, 3, 4, 8):
        raise ValueError(f"pack_bits: bits must be 1, 2, 3, 4 or 8, got {bits}")
    c = _pad_cols(codes.to(torch.int64), 8, pad)
    rows, cols = c.shape
    shifts = torch.arange(8, device=c.device, dtype=torch.int64) * bits
    words = (c.view(rows, cols // 8, 8) << shifts).sum(-1)  # at most 64 bits per run of 8
    byte_shifts = torch.arange(bits, device=c.device, dtype=torch.int64) * 8
    out = (words.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.to(torch.uint8).reshape(rows, cols // 8 * bits)


def unpack_bits(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack_bits`: [rows, cols] uint8 codes."""
    rows, nbytes = packed.shape
    b = packed.to(torch.int64).view(rows, nbytes // bits, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (b << byte_shifts).sum(-1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    c = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.to(torch.uint8).reshape(rows, nbytes // bits * 8)[:, :cols]


_POW3 = (1, 3, 9, 27, 81)


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Ternary codes 0..2 -> 5 per byte (1.6 bits per value): [rows, ceil(cols/5)] uint8."""
    c = _pad_cols(codes.to(torch.int32), 5, 1)
    rows, cols = c.shape
    pow3 = torch.tensor(_POW3, dtype=torch.int32, device=c.device)
    return (c.view(rows, cols // 5, 5) * pow3).sum(-1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of `pack_trits`: [rows, cols] uint8 codes in 0..2."""
    rows, n = packed.shape
    pow3 = torch.tensor(_POW3, dtype=torch.int32, device=packed.device)
    c = (packed.to(torch.int32).unsqueeze(-1) // pow3) % 3
    return c.to(torch.uint8).reshape(rows, n * 5)[:, :cols]


def pack_codes(codes: torch.Tensor, bits: int, pad: int = 0) -> torch.Tensor:
    """The packing `QuantLinear` keeps in memory: block-64 for 2-bit codes, a bit stream otherwise."""
    return pack_2bit(codes, pad) if bits == 2 else pack_bits(codes, bits, pad)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    return unpack_2bit(packed, cols) if bits == 2 else unpack_bits(packed, bits, cols)


def packed_cols(cols: int, bits: int) -> int:
    """Bytes per row of `pack_codes` output."""
    if bits == 2:
        return -(-cols // BLOCK) * (BLOCK // 4)
    return -(-cols // 8) * bits
