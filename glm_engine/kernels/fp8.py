"""FP8 (E4M3) linears. Prompt-sized steps: activations quantized per row by one Triton
kernel, then torch._scaled_mm (cuBLASLt's FP8 GEMM on the tensor cores, float32
accumulation) with the activation's per-row and the weight's per-channel scales
applied to the product. Decode-sized steps, where the time is the weight stream:
the activations as they are times the FP8 weights, converted in registers
(weight_only_mma.py). FP8 tensor cores need compute capability 8.9 (Ada) or later.

The per-row quantizer is quantize.py's. Reference: `reference.fp8_linear`."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from glm_engine import GlmEngineError
from glm_engine.kernels import reference
from glm_engine.kernels.quantize import quantize_rows
from glm_engine.kernels.reference import WEIGHT_ONLY_ROWS

MIN_CAPABILITY = (8, 9)


def make_linear(decode_gemm: Callable | None) -> Callable:
    """The FP8 linear op: steps of more than WEIGHT_ONLY_ROWS rows through `scaled_linear`;
    decode-sized ones through `decode_gemm` (the tensor-core GEMM of float16 engines, which
    reads FP8 weights as they are), else through the reference (it dequantizes the weight)."""

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_scales: torch.Tensor,
               quant_bits: int = 0) -> torch.Tensor:
        if x.shape[0] > WEIGHT_ONLY_ROWS:
            return scaled_linear(x, weight, bias, weight_scales)
        if decode_gemm is not None:
            return decode_gemm(x, weight, bias, weight_scales, 0)
        return reference.fp8_linear(x, weight, bias, weight_scales)

    return linear


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_scales: torch.Tensor,
                  quant_bits: int = 0) -> torch.Tensor:
    """x [M, K] @ W^T (+ bias) with x quantized per row: W [N, K] float8_e4m3fn with float32
    scales [N]; returns x's dtype."""
    values, scales = quantize_rows(x, torch.float8_e4m3fn)
    out_dtype = product_dtype(x.dtype, x.device)
    out = torch._scaled_mm(values, weight.t(), scale_a=scales, scale_b=weight_scales.view(1, -1),
                           out_dtype=out_dtype).to(x.dtype)
    return out.add_(bias) if bias is not None else out


@functools.cache
def product_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """`dtype` where torch._scaled_mm returns it with per-row scales on `device`, else
    bfloat16 (some torch releases return only bfloat16 there; the product is then cast)."""
    one = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
    scale = torch.ones(16, 1, device=device)
    try:
        torch._scaled_mm(one, one.t(), scale_a=scale, scale_b=scale.t(), out_dtype=dtype)
    except RuntimeError:
        return torch.bfloat16
    return dtype


def check_device(device: torch.device) -> None:
    """Refuses a GPU without FP8 tensor cores in one line."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise GlmEngineError(f"this engine was built with --enable_fp8, whose GEMMs need FP8 tensor cores "
                             f"(compute capability 8.9 or later: Ada, Hopper); this GPU has "
                             f"{capability[0]}.{capability[1]}. Rebuild without --enable_fp8, or run with "
                             f"--device cpu")

