"""Skinny GEMM ("gemm plugin" and weight-only GEMM) in Triton for decode steps:
y[M, N] = x[M, K] @ W[N, K]^T (+ bias) with few rows M, where the time is the
weight stream. Each program owns BLOCK_N output columns and walks all of K, so
every weight byte is read once; W may be the model dtype, or int8 / packed
int4 with one scale per output channel, dequantized in registers.

int4 packing: byte k//2 of a row holds weight k (even k) in its low nibble and
weight k+1 in its high nibble, as two's-complement 4-bit values.
Reference: `reference.linear` on the dequantized weight."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # the kernel pads x to 16 rows for tl.dot; more rows go to cuBLAS


@triton.jit
def _gemv_kernel(x, weight, weight_scales, bias, out, rows, N: tl.constexpr, K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
                 PRECISION: tl.constexpr):
    columns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    column_ok = columns < N
    row_ids = tl.arange(0, 16)
    row_ok = row_ids < rows
    acc = tl.zeros([16, BLOCK_N], tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xs = tl.load(x + row_ids[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if QUANT == 4:
            half = start // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(weight + columns[:, None] * (K // 2) + half[None, :],
                             mask=column_ok[:, None] & (half < K // 2)[None, :], other=0).to(tl.int8)
            low = (packed << 4) >> 4  # sign-extend the low nibble
            high = packed >> 4
            w = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K)).to(xs.dtype)
        else:
            w = tl.load(weight + columns[:, None] * K + ks[None, :], mask=column_ok[:, None] & k_ok[None, :],
                        other=0.0).to(xs.dtype)
        acc += tl.dot(xs, tl.trans(w), input_precision=PRECISION)
    if QUANT != 0:
        acc *= tl.load(weight_scales + columns, mask=column_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + columns, mask=column_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out + row_ids[:, None] * N + columns[None, :], acc.to(out.dtype.element_ty),
             mask=row_ok[:, None] & column_ok[None, :])


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         weight_scales: torch.Tensor | None = None, quant_bits: int = 0, block_n: int = 32,
         block_k: int | None = None, num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """x [M <= 16, K] @ W^T -> [M, N] in x's dtype. W: [N, K] in x's dtype (quant_bits 0),
    int8 [N, K] (8) or packed uint8 [N, K // 2] (4) with `weight_scales` [N].
    Default blocks: the fastest of scripts/tune_gemv.py on an H100 (docs/PERFORMANCE.md):
    256 weights of K per step, 512 for large fp16 matrices."""
    rows, k = x.shape
    n = weight.shape[0]
    if block_k is None:
        block_k = 512 if quant_bits == 0 and n * k >= 50_000_000 else 256
    if rows > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {rows}")
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    block_k = min(block_k, max(32, triton.next_power_of_2(k)))
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x.contiguous(), weight, weight_scales, bias, out, rows, N=n, K=k, BLOCK_N=block_n, BLOCK_K=block_k,
        QUANT=quant_bits, HAS_BIAS=bias is not None, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages)
    return out
