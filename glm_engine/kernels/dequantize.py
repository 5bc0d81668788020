"""Weight-only dequantization in Triton for the context phase: int8 or packed
int4 weights [N, K] and float32 scales (per output channel, or per group of
input channels) to the model dtype in one pass (1 or 1/2 byte read, 2 written
per weight), ahead of a cuBLAS GEMM.
Reference: `reference.dequantize`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm_engine.kernels.reference import scale_group_size


@triton.jit
def _dequantize_kernel(quantized, scales, out, K: tl.constexpr, QUANT: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if QUANT == 4:
        half = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(quantized + row * (K // 2) + half, mask=half < K // 2, other=0).to(tl.int8)
        values = tl.reshape(tl.join((packed << 4) >> 4, packed >> 4), (BLOCK_K,))
    else:
        columns = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        values = tl.load(quantized + row * K + columns, mask=columns < K, other=0)
    columns = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if GROUP:
        scale = tl.load(scales + row * (K // GROUP) + columns // GROUP, mask=columns < K, other=0.0).to(tl.float32)
    else:
        scale = tl.load(scales + row).to(tl.float32)
    tl.store(out + row * K + columns, (values.to(tl.float32) * scale).to(out.dtype.element_ty), mask=columns < K)


def dequantize(quantized: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in `dtype` of an int8 [N, K] or packed int4 [N, K // 2] weight
    with `scales` [N], or [N, K / group]."""
    rows = quantized.shape[0]
    k = quantized.shape[1] * (2 if bits == 4 else 1)
    out = torch.empty(rows, k, dtype=dtype, device=quantized.device)
    block_k = min(1024, triton.next_power_of_2(k))
    group = scale_group_size(scales, k)
    _dequantize_kernel[(rows, triton.cdiv(k, block_k))](quantized, scales, out, K=k, QUANT=bits, BLOCK_K=block_k,
                                                         GROUP=group)
    return out
