"""Building blocks that GLM networks share: a weight table (embedding or output
layer), the fused residual-add + RMSNorm, and a decoder linear stored as its
linear method says (dense, or weight-only int8/int4 with scales). Parameters are
made without storage and replaced by the engine's tensors when the network is built."""

from __future__ import annotations

import torch
from torch import nn

from glm_engine.runtime.op_table import Ops

# (A `with torch.device("meta")` block instead routes every factory call through
# torch._refs, whose first use imports torch._dynamo: seconds of start-up.)
UNLOADED = torch.device("meta")


def unloaded(*shape: int) -> nn.Parameter:
    """A parameter of `shape` without storage, filled when the engine's weights are assigned."""
    return nn.Parameter(torch.empty(shape, device=UNLOADED), requires_grad=False)


class Table(nn.Module):
    """A weight [rows, columns] read as an embedding table (`embed`) or a bias-free linear
    layer (`forward`). Not nn.Embedding / nn.Linear: their random initialization, wasted
    on weights that are replaced, imports torch._dynamo, seconds of start-up."""

    def __init__(self, rows: int, columns: int) -> None:
        super().__init__()
        self.weight = unloaded(rows, columns)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(token_ids, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.weight)


class RMSNorm(nn.Module):
    """RMSNorm that also adds a branch into the residual stream first (one kernel
    with --use_layernorm_plugin)."""

    def __init__(self, size: int, eps: float, ops: Ops) -> None:
        super().__init__()
        self.weight = unloaded(size)
        self.eps = eps
        self.add_rms_norm = ops.add_rms_norm

    def forward(self, branch: torch.Tensor | None, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized residual + branch, residual + branch)."""
        return self.add_rms_norm(branch, residual, self.weight, self.eps)


class DecoderLinear(nn.Module):
    """A linear layer of a decoder layer, its parameters as the engine's linear method
    stores them (quantization/methods.py: `weight` [out, in] in the model dtype, or
    int8 / packed int4 with `weight_scales`), computed by the op table's linear; a
    `gated` one is a fused [gate; up] projection whose output is SwiGLU(gate, up) [N, out / 2]
    (the op table's gated_linear: one kernel on the tensor-core GEMM)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ops: Ops, gated: bool = False) -> None:
        super().__init__()
        method = ops.linear_method
        self.quant_bits = method.bits
        shapes = method.parameter_shapes(out_features, in_features)
        self.weight = unloaded(*shapes["weight"])
        self.weight_scales = unloaded(*shapes["weight_scales"]) if "weight_scales" in shapes else None
        self.bias = unloaded(out_features) if bias else None
        self.linear = ops.gated_linear if gated else ops.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight, self.bias, self.weight_scales, self.quant_bits)
