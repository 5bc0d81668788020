"""Activation-aware weight quantization (AWQ, Lin et al. 2023) for int4 with group
scales: input channels that carry large activations matter most, so before rounding
each such column of W is scaled up by s (its quantization error shrinks relative to
it) and the input divided by s, folded into the op that produces the input, so the
network computes the same function. s = mean|x|^alpha per input channel, alpha
searched on a grid for the smallest output error of the quantized linear on
calibration inputs (glm_engine/tools/calibration.py gathers them).

The scales are folded as input_scaling.py says (the attention output projection is
rounded to nearest, as AutoAWQ does for grouped-query attention)."""

from __future__ import annotations

import torch

from glm_engine.quantization.input_scaling import LinearInputs, fold, scaled_linears
from glm_engine.quantization.methods import WeightOnly

ALPHA_GRID = 20  # alpha in 0, 1/20, ... 19/20


def quantization_error(weight: torch.Tensor, scales: torch.Tensor, sample: torch.Tensor, method: WeightOnly) -> float:
    """Mean squared output error on `sample` of `weight` [N, K] quantized by `method` after
    its columns are multiplied by `scales` [K] (and the input divided by them)."""
    quantized = method.quantize(weight * scales)
    dense = method.dequantize(quantized[""], quantized["_scales"], torch.float32) / scales
    return (sample @ (dense - weight).t()).pow(2).mean().item()


def search_scales(weight: torch.Tensor, inputs: LinearInputs, method: WeightOnly) -> tuple[torch.Tensor, float]:
    """The input-channel scales [K] of the grid's best alpha (on the calibration inputs'
    device), and that alpha."""
    sample = inputs.sample.float()
    weight = weight.to(sample.device).float()
    magnitude = inputs.mean_magnitude.float().clamp(min=1e-8)
    best = (quantization_error(weight, torch.ones_like(magnitude), sample, method), torch.ones_like(magnitude), 0.0)
    for step in range(1, ALPHA_GRID):
        alpha = step / ALPHA_GRID
        scales = magnitude.pow(alpha)
        scales = scales / (scales.max() * scales.min()).sqrt()  # centred around 1 in log scale
        error = quantization_error(weight, scales, sample, method)
        if error < best[0]:
            best = (error, scales, alpha)
    return best[1], best[2]


def apply_awq(weights: dict[str, torch.Tensor], num_layers: int, ffn_hidden_size: int,
              inputs: dict[str, LinearInputs], method: WeightOnly) -> dict[str, float]:
    """Scales the dense `weights` in place for `method` (input_scaling.py's folds, layer by
    layer; `inputs` keyed by linear name, e.g. "layers.0.mlp.dense_4h_to_h"); quantize them
    after. Returns each scaled linear's alpha."""
    alphas = {}
    for linear, producer, kind in scaled_linears(num_layers):
        scales, alphas[linear] = search_scales(weights[linear + ".weight"], inputs[linear], method)
        fold(weights, linear, producer, kind, scales, ffn_hidden_size)
    return alphas
