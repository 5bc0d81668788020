"""Scaling a decoder linear's input channels without changing the network: its weight's
columns times s, the op that makes its input divided by s. AWQ (awq.py) and SmoothQuant
(smoothquant.py) choose s; this module applies it, the same for every GLM family's
runtime layout:
- query_key_value: input = input_layernorm's output: the norm's weight / s
- dense_h_to_4h: input = post_attention_layernorm's output: the norm's weight / s
- dense_4h_to_h: input = silu(gate) * up: dense_h_to_4h's up rows / s
- dense: input = attention output, whose channels the query heads of a K/V group share
  through their values; left unscaled."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# (linear, the tensor that makes its input, and how: "norm" weight or "up" rows of the up projection)
FOLDS = (("self_attention.query_key_value", "input_layernorm.weight", "norm"),
         ("mlp.dense_h_to_4h", "post_attention_layernorm.weight", "norm"),
         ("mlp.dense_4h_to_h", "mlp.dense_h_to_4h.weight", "up"))


@dataclass
class LinearInputs:
    """Calibration statistics of one linear's input: mean and max |x| per input channel
    over every token, and a sample of input rows [rows, K]."""

    mean_magnitude: torch.Tensor
    max_magnitude: torch.Tensor
    sample: torch.Tensor


def scaled_linears(num_layers: int) -> list[tuple[str, str, str]]:
    """(linear name, producer tensor name, kind) of every scalable linear, layer by layer."""
    return [(f"layers.{layer}.{linear}", f"layers.{layer}.{producer}", kind)
            for layer in range(num_layers) for linear, producer, kind in FOLDS]


def fold(weights: dict[str, torch.Tensor], linear: str, producer: str, kind: str, scales: torch.Tensor,
         ffn_hidden_size: int) -> None:
    """Multiplies `linear`'s weight columns by `scales` [K] and divides its input's producer
    by them, in place, each tensor kept in its dtype."""
    weight = weights[linear + ".weight"]
    scales = scales.to(weight.device).float()
    weights[linear + ".weight"] = (weight.float() * scales).to(weight.dtype)
    source = weights[producer]
    if kind == "norm":
        weights[producer] = (source.float() / scales).to(source.dtype)
    else:  # the up half of [gate; up]
        folded = source.float()
        folded[ffn_hidden_size:] /= scales[:, None]
        weights[producer] = folded.to(source.dtype)
