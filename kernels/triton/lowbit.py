"""Triton kernels for the 2-bit block-64 layout (see workbench/quant/packing.py): y = x @ W.T.

W is given as qweight [N, Kp/4] uint8 (block j of a row = 16 bytes; byte m holds elements 64j+m,
+16, +32, +48 at bit shifts 0, 2, 4, 6), scale [N, K/G] float32 and zero [N, K/G] float32 or None
(ternary: the zero is 1); value = (code - zero) * scale.

* `_gemv_kernel` (few activation rows): one program per BLOCK_N output rows and activation row. For
  power-of-two group sizes the codes are summed per group against x and the scale/zero applied per
  group (zero via the group sums of x); otherwise every weight is dequantized.
* `_gemm_kernel` (more rows): dequantizes a [BLOCK_N, BLOCK_K] weight tile and uses tl.dot; fp32
  inputs use exact ("ieee") products, 16-bit inputs multiply in their dtype with fp32 accumulation.

Launches run on x's device (`torch.cuda.device`), so a model spread over GPUs works. Imported by
`workbench.quant.kernels` only when an input is on a CUDA device. With TRITON_INTERPRET=1 the kernels
also run on CPU tensors (tests/test_kernels.py checks them so in every run); there a bfloat16 GEMM
takes its dot in float32 (``DOT_F32``) from the same bfloat16-rounded operands, because the
interpreter (triton 3.9) keeps bfloat16 as raw uint16 bits and its tl.dot multiplies those bits.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

GEMV_MAX_ROWS = 4


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, N, K, NG, row_bytes, stride_x, stride_y,
                 G: tl.constexpr, HAS_ZERO: tl.constexpr, GROUPED: tl.constexpr, NGT: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs = tl.arange(0, BLOCK_K)
    byte = (offs // 64) * 16 + offs % 16  # byte of element `offs` within the tile's blocks
    shift = ((offs // 16) % 4) * 2
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        k_ok = k < K
        x = tl.load(x_ptr + b * stride_x + k, mask=k_ok, other=0.0).to(tl.float32)
        qb = tl.load(q_ptr + rows[:, None] * row_bytes + (k0 // 4 + byte)[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0).to(tl.int32)
        code = ((qb >> shift[None, :]) & 3).to(tl.float32)
        if GROUPED:
            # BLOCK_K = NGT * G: per-group sums, then one scale (and zero) per group
            part = tl.sum(tl.reshape(code * x[None, :], [BLOCK_N, NGT, G]), axis=2)
            xsum = tl.sum(tl.reshape(x, [NGT, G]), axis=1)
            g = k0 // G + tl.arange(0, NGT)
            g_ok = row_ok[:, None] & (g < NG)[None, :]
            sc = tl.load(s_ptr + rows[:, None] * NG + g[None, :], mask=g_ok, other=0.0)
            if HAS_ZERO:
                zr = tl.load(z_ptr + rows[:, None] * NG + g[None, :], mask=g_ok, other=0.0)
            else:
                zr = tl.full([BLOCK_N, NGT], 1.0, tl.float32)
            acc += tl.sum((part - zr * xsum[None, :]) * sc, axis=1)
        else:
            g = k // G
            g_ok = row_ok[:, None] & k_ok[None, :]
            sc = tl.load(s_ptr + rows[:, None] * NG + g[None, :], mask=g_ok, other=0.0)
            if HAS_ZERO:
                zr = tl.load(z_ptr + rows[:, None] * NG + g[None, :], mask=g_ok, other=0.0)
                w = (code - zr) * sc
            else:
                w = (code - 1.0) * sc
            acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + b * stride_y + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, B, N, K, NG, row_bytes, stride_x, stride_y,
                 G: tl.constexpr, HAS_ZERO: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    bs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < N
    b_ok = bs < B
    offs = tl.arange(0, BLOCK_K)
    byte = (offs // 64) * 16 + offs % 16
    shift = ((offs // 16) % 4) * 2
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        k_ok = k < K
        x = tl.load(x_ptr + bs[:, None] * stride_x + k[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = row_ok[:, None] & k_ok[None, :]
        qb = tl.load(q_ptr + rows[:, None] * row_bytes + (k0 // 4 + byte)[None, :], mask=w_ok, other=0).to(tl.int32)
        code = ((qb >> shift[None, :]) & 3).to(tl.float32)
        g = k // G
        sc = tl.load(s_ptr + rows[:, None] * NG + g[None, :], mask=w_ok, other=0.0)
        if HAS_ZERO:
            zr = tl.load(z_ptr + rows[:, None] * NG + g[None, :], mask=w_ok, other=0.0)
            w = (code - zr) * sc
        else:
            w = (code - 1.0) * sc
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        elif DOT_F32:  # the 16-bit products exactly, as on a GPU: only the summation order differs
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(x.dtype).to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(y_ptr + bs[:, None] * stride_y + rows[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=b_ok[:, None] & row_ok[None, :])


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes ``device`` current for a launch (Triton launches on the current CUDA device); nothing for
    CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def lowbit_gemm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                group_size: int, K: int) -> torch.Tensor:
    """x [B, K] (float32/bfloat16/float16) @ W.T -> [B, N] in x's dtype."""
    if x.dim() != 2 or x.shape[1] != K or K % group_size:
        raise ValueError(f"lowbit_gemm: x {tuple(x.shape)}, K {K}, group_size {group_size}")
    x = x.contiguous()
    qweight, scale = qweight.contiguous(), scale.contiguous().float()
    zero = None if zero is None else zero.contiguous().float()
    B, N, row_bytes, NG = x.shape[0], qweight.shape[0], qweight.shape[1], K // group_size
    y = torch.empty(B, N, dtype=x.dtype, device=x.device)
    if B == 0 or N == 0:
        return y
    z = zero if zero is not None else scale  # never read without HAS_ZERO
    with device_guard(x.device):
        if B <= GEMV_MAX_ROWS:
            grouped = group_size & (group_size - 1) == 0 and group_size <= 512
            block_k = max(128, group_size) if grouped else 128
            block_n = 16
            grid = (triton.cdiv(N, block_n), B)
            _gemv_kernel[grid](x, qweight, scale, z, y, N, K, NG, row_bytes, x.stride(0), y.stride(0),
                               G=group_size, HAS_ZERO=zero is not None, GROUPED=grouped,
                               NGT=block_k // group_size if grouped else 1, BLOCK_N=block_n, BLOCK_K=block_k,
                               num_warps=4)
        else:
            block_b, block_n, block_k = 16, 64, 64
            grid = (triton.cdiv(N, block_n), triton.cdiv(B, block_b))
            _gemm_kernel[grid](x, qweight, scale, z, y, B, N, K, NG, row_bytes, x.stride(0), y.stride(0),
                               G=group_size, HAS_ZERO=zero is not None, IEEE=x.dtype == torch.float32,
                               DOT_F32=x.dtype == torch.bfloat16 and x.device.type != "cuda",
                               BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return y
