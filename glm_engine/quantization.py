"""Weight-only quantization (int8, or int4 packed two per byte, symmetric per output
channel): of one weight, of an engine's weight dict, and the inverse of the latter
(per tensor: kernels/reference.dequantize, the reference of the dequantize kernel)."""

from __future__ import annotations

import torch
from tqdm import tqdm

from glm_engine import GlmEngineError
from glm_engine.config import ModelConfig
from glm_engine.kernels import reference
from glm_engine.layout import quantized_weight_names

BITS = {"int8": 8, "int4": 4}


def quantize_per_channel(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of weight [N, K]: int8 values with
    scale max|w|/127 (bits 8), or int4 values in [-7, 7] with scale max|w|/7 packed two
    per byte along K (bits 4: low nibble = even k). Returns (quantized, float32 scales [N])."""
    limit = 127 if bits == 8 else 7
    scales = weight.float().abs().amax(dim=1).clamp(min=1e-10) / limit
    values = torch.round(weight.float() / scales[:, None]).clamp(-limit, limit).to(torch.int8)
    if bits == 8:
        return values, scales
    if weight.shape[1] % 2:
        raise ValueError("int4 packing needs an even number of input channels")
    low, high = values[:, 0::2], values[:, 1::2]
    return ((low & 0x0F) | (high << 4)).to(torch.uint8), scales


def quantize_weights(weights: dict[str, torch.Tensor], config: ModelConfig, precision: str,
                     progress: bool = False) -> dict[str, torch.Tensor]:
    """Quantizes every decoder-layer linear weight in place, adding float32
    per-output-channel `weight_scales` (`<name>_scales`); the embedding, norms,
    biases and output layer stay as they are."""
    bits = BITS[precision]
    if bits == 4 and config.hidden_size % 2 + config.q_size % 2 + config.ffn_hidden_size % 2:
        raise GlmEngineError("int4 weight-only needs even input sizes (hidden, heads * kv_channels, ffn)")
    for name in tqdm(quantized_weight_names(config), desc=f"Quantizing to {precision}", disable=not progress):
        weights[name], weights[name + "_scales"] = quantize_per_channel(weights[name], bits)
    return weights


def dequantize_weights(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Weights with every quantized linear replaced by the dense weight it stands for,
    in `dtype` (int4 is recognized by its uint8 storage); the others unchanged."""
    dense = {}
    for name, tensor in weights.items():
        if name.endswith("_scales"):
            continue
        scales = weights.get(name + "_scales")
        if scales is None:
            dense[name] = tensor
        else:
            bits = 4 if tensor.dtype == torch.uint8 else 8
            dense[name] = reference.dequantize(tensor, scales, bits, dtype)
    return dense
