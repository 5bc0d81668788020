"""INT8 W8A8 linears (SmoothQuant). Prompt-sized steps: activations quantized per row
to int8 by one Triton kernel, then torch._int_mm (int8 tensor cores, exact int32 sums),
the per-row and per-channel scales and the bias applied to the sums by one more kernel
(one pass over them: as four torch ops they cost a 2048-token prefill 20+ ms on an
H100). Decode-sized steps, where the
time is the weight stream, multiply the activations as they are by the int8 weights in
the skinny GEMM (gemv.py). The per-row quantizer is quantize.py's.
Reference: `reference.int8_linear`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from glm_engine.kernels import reference
from glm_engine.kernels.launch import dependent_launch, wait_for_previous_kernel
from glm_engine.kernels.quantize import quantize_rows
from glm_engine.kernels.reference import WEIGHT_ONLY_ROWS


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_scales: torch.Tensor,
                  quant_bits: int = 8) -> torch.Tensor:
    """x [M > 16, K] @ W^T (+ bias) with x quantized per row: W [N, K] int8 with float32
    scales [N]; returns x's dtype."""
    values, scales = quantize_rows(x, torch.int8)
    return scale_sums(torch._int_mm(values, weight.t()), scales, weight_scales, bias, x.dtype)


@triton.jit
def _scale_sums_kernel(sums, row_scales, weight_scales, bias, out, M, N, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    columns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (columns < N)[None, :]
    offsets = rows.to(tl.int64)[:, None] * N + columns[None, :]
    total = tl.load(sums + offsets, mask=mask, other=0).to(tl.float32)
    # The reference's order: (sums x row scale) x column scale, rounded to the output dtype, then the bias.
    scaled = total * tl.load(row_scales + rows, mask=rows < M, other=0.0)[:, None]
    scaled = _rounded(scaled * tl.load(weight_scales + columns, mask=columns < N, other=0.0)[None, :],
                      out.dtype.element_ty)
    if HAS_BIAS:  # added in float32 and rounded, as torch adds half-precision tensors
        scaled = _rounded(scaled + tl.load(bias + columns, mask=columns < N, other=0.0)[None, :].to(tl.float32),
                          out.dtype.element_ty)
    tl.store(out + offsets, scaled.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """float32 `x` rounded to the nearest `dtype` value (ties to even), kept in float32;
    bfloat16 by its bits (the interpreter's cast truncates)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return x.to(dtype).to(tl.float32)


def scale_sums(sums: torch.Tensor, row_scales: torch.Tensor, weight_scales: torch.Tensor,
               bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """int32 sums [M, N] times float32 `row_scales` [M, 1] and `weight_scales` [N], as
    `dtype`, plus `bias` [N] (`dtype`): reference.int8_linear's scaling, in one pass."""
    rows, columns = sums.shape
    out = torch.empty(rows, columns, dtype=dtype, device=sums.device)
    block_m, block_n = 32, 128
    _scale_sums_kernel[(triton.cdiv(rows, block_m), triton.cdiv(columns, block_n))](
        sums, row_scales, weight_scales, bias, out, rows, columns, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, enable_fp_fusion=False,  # no FMA: the reference rounds twice
        **dependent_launch(_scale_sums_kernel, sums.device))
    return out


def make_linear(decode_gemm: Callable | None) -> Callable:
    """The SmoothQuant linear op: steps of more than WEIGHT_ONLY_ROWS rows through
    `scaled_linear`; decode-sized ones through `decode_gemm` (the skinny GEMM on int8
    weights with per-channel scales), else through the reference."""

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_scales: torch.Tensor,
               quant_bits: int = 8) -> torch.Tensor:
        if x.shape[0] > WEIGHT_ONLY_ROWS:
            return scaled_linear(x, weight, bias, weight_scales)
        if decode_gemm is not None:
            return decode_gemm(x, weight, bias, weight_scales, 8)
        return reference.int8_linear(x, weight, bias, weight_scales)

    return linear
