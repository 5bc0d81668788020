"""SwiGLU in Triton: silu(a) * b of the fused up-projection [a, b] in one pass.
Reference: `reference.swiglu`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm_engine.kernels.launch import dependent_launch, wait_for_previous_kernel


@triton.jit
def _swiglu_kernel(gate_up, out, WIDTH: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = columns < WIDTH
    gate = tl.load(gate_up + row * 2 * WIDTH + columns, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(gate_up + row * 2 * WIDTH + WIDTH + columns, mask=inside, other=0.0).to(tl.float32)
    result = gate * tl.sigmoid(gate) * up
    tl.store(out + row * WIDTH + columns, result.to(out.dtype.element_ty), mask=inside)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for rows [N, 2F] = [a, b]; returns [N, F]."""
    rows, double_width = gate_up.shape
    width = double_width // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(width))
    _swiglu_kernel[(rows, triton.cdiv(width, block))](gate_up.contiguous(), out, WIDTH=width, BLOCK=block,
                                                         **dependent_launch(_swiglu_kernel, gate_up.device))
    return out
