"""Fused residual add + RMSNorm ("layernorm plugin") in Triton: one pass reads
the new branch output and the residual stream, writes the updated residual
and its normalized form. Reference: `reference.add_rms_norm`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm_engine.kernels.launch import dependent_launch, wait_for_previous_kernel


@triton.jit
def _add_rms_norm_kernel(branch, residual, weight, normed_out, residual_out, eps, HIDDEN: tl.constexpr,
                         BLOCK: tl.constexpr, HAS_BRANCH: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    inside = columns < HIDDEN
    x = tl.load(residual + row * HIDDEN + columns, mask=inside, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        x += tl.load(branch + row * HIDDEN + columns, mask=inside, other=0.0).to(tl.float32)
        # The residual stream is kept in the model dtype, as the unfused network keeps it.
        x = x.to(residual_out.dtype.element_ty)
        tl.store(residual_out + row * HIDDEN + columns, x, mask=inside)
        x = x.to(tl.float32)
    scale = tl.rsqrt(tl.sum(x * x, axis=0) / HIDDEN + eps)
    w = tl.load(weight + columns, mask=inside, other=0.0).to(tl.float32)
    tl.store(normed_out + row * HIDDEN + columns, (x * scale * w).to(normed_out.dtype.element_ty), mask=inside)


def add_rms_norm(branch: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + branch) * weight, residual + branch); without a branch,
    (RMSNorm(residual) * weight, residual). Rows of [N, hidden]."""
    rows, hidden = residual.shape
    residual = residual.contiguous()
    branch = None if branch is None else branch.contiguous()
    normed = torch.empty_like(residual)
    updated = torch.empty_like(residual) if branch is not None else residual
    _add_rms_norm_kernel[(rows,)](branch if branch is not None else residual, residual, weight, normed, updated,
                                  eps, HIDDEN=hidden, BLOCK=triton.next_power_of_2(hidden),
                                  HAS_BRANCH=branch is not None, num_warps=8 if hidden >= 2048 else 4,
                                  **dependent_launch(_add_rms_norm_kernel, residual.device))
    return normed, updated
