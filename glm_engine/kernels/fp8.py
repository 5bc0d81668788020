"""FP8 (E4M3) linears. Prompt-sized steps: activations quantized per row by one Triton
kernel, then torch._scaled_mm (cuBLASLt's FP8 GEMM on the tensor cores, float32
accumulation) with the activation's per-row and the weight's per-channel scales
applied to the product. Decode-sized steps, where the time is the weight stream:
the activations as they are times the FP8 weights, converted in registers
(weight_only_mma.py). FP8 tensor cores need compute capability 8.9 (Ada) or later.

The quantizer rounds each value to the nearest FP8 number (ties to even) with
float32 arithmetic before it converts, so the conversion itself is exact: Triton's
interpreter converts float32 to FP8 by truncation in some releases, and this
keeps the CPU tests and the GPU bit for bit alike.
Reference: `reference.quantize_rows_fp8` and `reference.fp8_linear`."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from glm_engine import GlmEngineError
from glm_engine.kernels import reference
from glm_engine.kernels.launch import dependent_launch, wait_for_previous_kernel
from glm_engine.kernels.reference import WEIGHT_ONLY_ROWS

MIN_CAPABILITY = (8, 9)


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
def _quantize_rows_kernel(x, values, scales, K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    inside = columns < K
    row_values = tl.load(x + row * K + columns, mask=inside, other=0.0).to(tl.float32)
    # IEEE divisions, as torch's (Triton's `/` on float32 is approximate on a GPU)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(row_values), axis=0), 1e-12), 448.0)  # reference.FP8_MAX
    rounded = round_to_e4m3(tl.math.div_rn(row_values, scale))
    tl.store(values + row * K + columns, rounded.to(values.dtype.element_ty), mask=inside)
    tl.store(scales + row, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as float8_e4m3fn values [M, K] and float32 scales [M, 1] (max|row| / 448)."""
    rows, columns = x.shape
    values = torch.empty(rows, columns, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(columns)
    _quantize_rows_kernel[(rows,)](x.contiguous(), values, scales, K=columns, BLOCK=block,
                                   num_warps=min(16, max(4, block // 1024)),
                                   **dependent_launch(_quantize_rows_kernel, x.device))
    return values, scales


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
    values, scales = quantize_rows(x)
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

