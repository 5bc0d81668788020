"""INT8 W8A8 linears (SmoothQuant). Prompt-sized steps: activations quantized per row
to int8 by one Triton kernel, then torch._int_mm (int8 tensor cores, exact int32 sums),
the per-row and per-channel scales applied to the sums. Decode-sized steps, where the
time is the weight stream, multiply the activations as they are by the int8 weights in
the skinny GEMM (gemv.py). The quantizer rounds with float32 arithmetic whose results
are exact integers, so its conversion is exact on the GPU and in Triton's interpreter.
Reference: `reference.quantize_rows_int8` and `reference.int8_linear`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from glm_engine.kernels import reference
from glm_engine.kernels.launch import dependent_launch, wait_for_previous_kernel
from glm_engine.kernels.reference import WEIGHT_ONLY_ROWS

ROUNDING = 12582912.0  # 1.5 * 2^23: x + it - it rounds |x| < 2^22 to an integer, ties to even


@triton.jit
def _quantize_rows_kernel(x, values, scales, K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    inside = columns < K
    row_values = tl.load(x + row * K + columns, mask=inside, other=0.0).to(tl.float32)
    # IEEE divisions, as torch's (Triton's `/` on float32 is approximate on a GPU)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(row_values), axis=0), 1e-12), 127.0)
    rounded = (tl.math.div_rn(row_values, scale) + 12582912.0) - 12582912.0  # ROUNDING
    rounded = tl.minimum(tl.maximum(rounded, -127.0), 127.0)
    tl.store(values + row * K + columns, rounded.to(tl.int8), mask=inside)
    tl.store(scales + row, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as int8 values [M, K] and float32 scales [M, 1] (max|row| / 127)."""
    rows, columns = x.shape
    values = torch.empty(rows, columns, dtype=torch.int8, device=x.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(columns)
    _quantize_rows_kernel[(rows,)](x.contiguous(), values, scales, K=columns, BLOCK=block,
                                   num_warps=min(16, max(4, block // 1024)),
                                   **dependent_launch(_quantize_rows_kernel, x.device))
    return values, scales


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_scales: torch.Tensor,
                  quant_bits: int = 8) -> torch.Tensor:
    """x [M > 16, K] @ W^T (+ bias) with x quantized per row: W [N, K] int8 with float32
    scales [N]; returns x's dtype."""
    values, scales = quantize_rows(x)
    sums = torch._int_mm(values, weight.t())
    out = (sums.float() * scales * weight_scales.view(1, -1)).to(x.dtype)
    return out.add_(bias) if bias is not None else out


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
