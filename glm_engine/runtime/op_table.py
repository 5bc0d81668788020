"""The op table a network computes with: one choice per op, made once per engine and
device by ops.select_ops. The network's layers take their op from it when they are built."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from glm_engine.runtime.attention import PagedAttention, ReferenceAttention
from glm_engine.config import BuildConfig
from glm_engine.quantization import Unquantized, linear_method

Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, int], torch.Tensor]


@dataclass(frozen=True)
class Ops:
    """One choice per op. `build` is the flags the network is built with: the engine's,
    or with every kernel flag off when the kernels cannot run."""

    build: BuildConfig
    add_rms_norm: Callable  # (branch | None, residual, weight, eps) -> (normed, residual)
    linear: Linear  # (x, weight, bias, weight_scales, quant_bits) -> x @ W^T + bias
    # swiglu(linear(...)) of the fused up projection [gate, up] -> [N, F]: one kernel on the tensor-core GEMM
    gated_linear: Linear
    attention: ReferenceAttention | PagedAttention
    # Tensor parallelism (runtime/distributed.py): the sum of a row-parallel layer's
    # partial outputs over ranks, and logits [N, vocab] from each rank's vocabulary
    # share; both return their input at world size 1.
    all_reduce: Callable = lambda partial: partial
    gather_vocab: Callable = lambda logits: logits
    # The engine's weights (runtime-layout names) as `linear` reads them: unchanged, or the
    # quantized ones shuffled into the tensor-core GEMM's layout (kernels/weight_only_mma.py).
    prepare_weights: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda weights: weights

    @property
    def linear_method(self) -> Unquantized:
        """How the decoder linears' weights are stored (quantization/methods.py)."""
        return linear_method(self.build)
