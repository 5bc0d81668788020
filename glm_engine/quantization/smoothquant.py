"""SmoothQuant (Xiao et al. 2023): activations have a few channels far larger than the
rest, which per-token int8 rounds coarsely; weights do not. Each input channel j of a
linear is divided by s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) (folded into the op
that makes the input, input_scaling.py) and the weight's column multiplied by it, moving
part of the activations' range into the weights before both are rounded to int8.
max|x_j| comes from calibration (glm_engine/tools/calibration.py)."""

from __future__ import annotations

import torch

from glm_engine.quantization.input_scaling import LinearInputs, fold, scaled_linears


def smoothing_scales(weight: torch.Tensor, inputs: LinearInputs, alpha: float) -> torch.Tensor:
    """s [K] for `weight` [N, K] and its calibration inputs."""
    activation = inputs.max_magnitude.float().cpu().clamp(min=1e-5)
    weight_range = weight.float().abs().amax(dim=0).cpu().clamp(min=1e-5)
    return (activation.pow(alpha) / weight_range.pow(1 - alpha)).clamp(min=1e-5)


def apply_smoothquant(weights: dict[str, torch.Tensor], num_layers: int, ffn_hidden_size: int,
                      inputs: dict[str, LinearInputs], alpha: float) -> None:
    """Smooths the dense `weights` in place (input_scaling.py's folds); quantize them after."""
    for linear, producer, kind in scaled_linears(num_layers):
        fold(weights, linear, producer, kind, smoothing_scales(weights[linear + ".weight"], inputs[linear], alpha),
             ffn_hidden_size)
