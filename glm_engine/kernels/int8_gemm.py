"""INT8 W8A8 linears (SmoothQuant). Prompt-sized steps: activations quantized per row
to int8 by one Triton kernel, then torch._int_mm (int8 tensor cores, exact int32 sums),
the per-row and per-channel scales applied to the sums. Decode-sized steps, where the
time is the weight stream, multiply the activations as they are by the int8 weights in
the skinny GEMM (gemv.py). The per-row quantizer is quantize.py's.
Reference: `reference.int8_linear`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from glm_engine.kernels import reference
from glm_engine.kernels.quantize import quantize_rows
from glm_engine.kernels.reference import WEIGHT_ONLY_ROWS


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_scales: torch.Tensor,
                  quant_bits: int = 8) -> torch.Tensor:
    """x [M > 16, K] @ W^T (+ bias) with x quantized per row: W [N, K] int8 with float32
    scales [N]; returns x's dtype."""
    values, scales = quantize_rows(x, torch.int8)
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
