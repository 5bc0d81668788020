"""Quantizing activations and cache values in Triton kernels: each row of x to FP8 E4M3
(scale max|row| / 448) or INT8 (max|row| / 127) in one kernel, and the rounding helpers
the K/V cache stores share (cache_format.py). Both formats round with float32 arithmetic
whose results are exact in the target type, so the conversion itself is exact: Triton's
interpreter converts float32 to FP8 by truncation in some releases, and this keeps the
CPU tests and the GPU bit for bit alike. Divisions are IEEE (`div_rn`), as torch's
(Triton's `/` on float32 is approximate on a GPU).
Reference: `reference.quantize_rows_fp8` and `reference.quantize_rows_int8`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm_engine.kernels.launch import dependent_launch, wait_for_previous_kernel
from glm_engine.kernels.reference import FP8_MAX

LIMITS = {torch.float8_e4m3fn: FP8_MAX, torch.int8: 127.0}  # the largest magnitude of each format


@triton.jit
def round_to_e4m3(value):
    """`value` (float32, |value| <= 448) rounded to the nearest E4M3 number, ties to even.
    Adding and subtracting 1.5 * 2^23 ulp rounds to a multiple of the ulp in the float32
    adder; E4M3's ulp is 2^(exponent - 3), and 2^-9 below its smallest normal 2^-6."""
    bits = value.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    magic = ((exponent - 3 + 23 + 127) << 23).to(tl.float32, bitcast=True) * 1.5
    magnitude = (tl.abs(value) + magic) - magic
    return tl.where(bits < 0, -magnitude, magnitude)  # the sign bit: -0 stays -0


@triton.jit
def round_to_int8(value):
    """`value` (float32) rounded to an integer, ties to even (1.5 * 2^23 added and taken
    away), within +-127."""
    return tl.minimum(tl.maximum((value + 12582912.0) - 12582912.0, -127.0), 127.0)


@triton.jit
def _quantize_rows_kernel(x, values, scales, K: tl.constexpr, BLOCK: tl.constexpr, LIMIT: tl.constexpr,
                          INT8: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    inside = columns < K
    row_values = tl.load(x + row * K + columns, mask=inside, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(row_values), axis=0), 1e-12), LIMIT)
    scaled = tl.math.div_rn(row_values, scale)
    if INT8:
        rounded = round_to_int8(scaled)
    else:
        rounded = round_to_e4m3(scaled)
    tl.store(values + row * K + columns, rounded.to(values.dtype.element_ty), mask=inside)
    tl.store(scales + row, scale)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as `dtype` (float8_e4m3fn or int8) values [M, K] and float32 scales [M, 1]
    (max|row| / LIMITS[dtype])."""
    rows, columns = x.shape
    values = torch.empty(rows, columns, dtype=dtype, device=x.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(columns)
    _quantize_rows_kernel[(rows,)](x.contiguous(), values, scales, K=columns, BLOCK=block, LIMIT=LIMITS[dtype],
                                   INT8=dtype == torch.int8, num_warps=min(16, max(4, block // 1024)),
                                   **dependent_launch(_quantize_rows_kernel, x.device))
    return values, scales
