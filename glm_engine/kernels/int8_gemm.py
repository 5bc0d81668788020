"""INT8 W8A8 linears (SmoothQuant). Prompt-sized steps: activations quantized per row
to int8 by one Triton kernel (quantize.py's), then an int8 GEMM with exact int32 sums
whose per-row and per-channel scales and bias are applied in the reference's order.
The GEMM is one of two, per weight shape as launch_configs.json's "int8_gemm" entries
choose (benchmarks/tune_int8_gemm.py measures both): torch._int_mm (cuBLAS) followed by
one scaling kernel over its int32 sums (as four torch ops the scaling cost a 2048-token
prefill 20+ ms on an H100), or one Triton kernel with the scaling in its epilogue,
which never writes the int32 sums (4 bytes an output) to memory. Decode-sized steps,
where the time is the weight stream, multiply the activations as they are by the int8
weights in the skinny GEMM (gemv.py). Reference: `reference.int8_linear`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from glm_engine.kernels import launch_configs, reference
from glm_engine.kernels.launch import dependent_launch, wait_for_previous_kernel
from glm_engine.kernels.quantize import quantize_rows
from glm_engine.kernels.reference import WEIGHT_ONLY_ROWS


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_scales: torch.Tensor,
                  quant_bits: int = 8) -> torch.Tensor:
    """x [M > 16, K] @ W^T (+ bias) with x quantized per row: W [N, K] int8 with float32
    scales [N]; returns x's dtype."""
    values, scales = quantize_rows(x, torch.int8)
    n, k = weight.shape
    choice = launch_configs.choice("int8_gemm", launch_configs.architecture(x.device), n=n, k=k)
    if choice["fused"]:
        return fused_gemm(values, weight, scales, weight_scales, bias, x.dtype, choice)
    return scale_sums(torch._int_mm(values, weight.t()), scales, weight_scales, bias, x.dtype)


@triton.jit
def _scaled(total, rows, columns, row_scales, weight_scales, bias, M, N, HAS_BIAS: tl.constexpr, dtype: tl.constexpr):
    """Exact int32 sums [rows, columns] scaled as the reference does, as float32 holding
    `dtype` values: (sums x row scale) x column scale, rounded to `dtype`, then the bias
    added in float32 and rounded again (as torch adds half-precision tensors)."""
    scaled = total.to(tl.float32) * tl.load(row_scales + rows, mask=rows < M, other=0.0)[:, None]
    scaled = _rounded(scaled * tl.load(weight_scales + columns, mask=columns < N, other=0.0)[None, :], dtype)
    if HAS_BIAS:
        scaled = _rounded(scaled + tl.load(bias + columns, mask=columns < N, other=0.0)[None, :].to(tl.float32),
                          dtype)
    return scaled


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """float32 `x` rounded to the nearest `dtype` value (ties to even), kept in float32;
    bfloat16 by its bits (the interpreter's cast truncates)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return x.to(dtype).to(tl.float32)


@triton.jit
def _scale_sums_kernel(sums, row_scales, weight_scales, bias, out, M, N, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    columns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (columns < N)[None, :]
    offsets = rows.to(tl.int64)[:, None] * N + columns[None, :]
    total = tl.load(sums + offsets, mask=mask, other=0)
    scaled = _scaled(total, rows, columns, row_scales, weight_scales, bias, M, N, HAS_BIAS, out.dtype.element_ty)
    tl.store(out + offsets, scaled.to(out.dtype.element_ty), mask=mask)


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


@triton.jit
def _fused_gemm_kernel(values, weight, row_scales, weight_scales, bias, out, M, N, K, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       EVEN_K: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    # Programs walk GROUP_M row blocks down each column block, so a column block of the
    # weight is read from L2, not HBM, by the row blocks after the first.
    program = tl.program_id(0)
    column_blocks = tl.cdiv(N, BLOCK_N)
    group = program // (GROUP_M * column_blocks)
    first_row_block = group * GROUP_M
    group_rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first_row_block, GROUP_M)
    in_group = program % (GROUP_M * column_blocks)
    rows = (first_row_block + in_group % group_rows) * BLOCK_M + tl.arange(0, BLOCK_M)
    columns = (in_group // group_rows) * BLOCK_N + tl.arange(0, BLOCK_N)
    depth = tl.arange(0, BLOCK_K)
    # Rows and columns past the end read row/column 0 (their results are not stored): no load masks.
    a = values + tl.where(rows < M, rows, 0).to(tl.int64)[:, None] * K + depth[None, :]
    b = weight + tl.where(columns < N, columns, 0).to(tl.int64)[None, :] * K + depth[:, None]
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for start in range(0, K, BLOCK_K):
        if EVEN_K:
            a_tile, b_tile = tl.load(a), tl.load(b)
        else:
            a_tile = tl.load(a, mask=(start + depth < K)[None, :], other=0)
            b_tile = tl.load(b, mask=(start + depth < K)[:, None], other=0)
        total = tl.dot(a_tile, b_tile, total, out_dtype=tl.int32)
        a += BLOCK_K
        b += BLOCK_K
    scaled = _scaled(total, rows, columns, row_scales, weight_scales, bias, M, N, HAS_BIAS, out.dtype.element_ty)
    mask = (rows < M)[:, None] & (columns < N)[None, :]
    tl.store(out + rows.to(tl.int64)[:, None] * N + columns[None, :], scaled.to(out.dtype.element_ty), mask=mask)


def fused_gemm(values: torch.Tensor, weight: torch.Tensor, row_scales: torch.Tensor, weight_scales: torch.Tensor,
               bias: torch.Tensor | None, dtype: torch.dtype, choice: dict) -> torch.Tensor:
    """int8 values [M, K] @ int8 weight [N, K]^T in int32, scaled by float32 `row_scales`
    [M, 1] and `weight_scales` [N], as `dtype`, plus `bias` [N]: scale_sums(torch._int_mm(...))
    in one kernel. `choice`: block_m, block_n, block_k, group_m, num_warps, num_stages."""
    rows, depth = values.shape
    columns = weight.shape[0]
    out = torch.empty(rows, columns, dtype=dtype, device=values.device)
    block_m, block_n, block_k = choice["block_m"], choice["block_n"], choice["block_k"]
    grid = (triton.cdiv(rows, block_m) * triton.cdiv(columns, block_n),)
    _fused_gemm_kernel[grid](
        values, weight, row_scales, weight_scales, bias, out, rows, columns, depth, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=choice["group_m"], EVEN_K=depth % block_k == 0,
        num_warps=choice["num_warps"], num_stages=choice["num_stages"],
        enable_fp_fusion=False,  # no FMA in the epilogue: the reference rounds twice
        **dependent_launch(_fused_gemm_kernel, values.device))
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
