"""Weight-only quantization (int8, or int4 packed two per byte, symmetric per output
channel or per group of input channels of each output channel): of one weight, of an
engine's weight dict, and the inverse of the latter (per tensor: kernels/reference.dequantize,
the reference of the dequantize kernel)."""

from __future__ import annotations

import torch
from tqdm import tqdm

from glm_engine import GlmEngineError
from glm_engine.config import ModelConfig
from glm_engine.kernels import reference
from glm_engine.layout import quantized_weight_names

BITS = {"int8": 8, "int4": 4}


def quantize_symmetric(weight: torch.Tensor, bits: int, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of weight [N, K]: int8 values with scale max|w|/127 (bits 8),
    or int4 values in [-7, 7] with scale max|w|/7 packed two per byte along K (bits 4: low
    nibble = even k). One scale per output channel (`group_size` 0: float32 scales [N]) or
    per `group_size` consecutive input channels of each (float32 scales [N, K / group_size])."""
    limit = 127 if bits == 8 else 7
    rows, columns = weight.shape
    if group_size:
        if columns % group_size:
            raise ValueError(f"group size {group_size} does not divide the {columns} input channels")
        scales = weight.float().view(rows, columns // group_size, group_size).abs().amax(dim=2).clamp(min=1e-10) / limit
        expanded = scales.repeat_interleave(group_size, dim=1)
    else:
        scales = weight.float().abs().amax(dim=1).clamp(min=1e-10) / limit
        expanded = scales[:, None]
    values = torch.round(weight.float() / expanded).clamp(-limit, limit).to(torch.int8)
    if bits == 8:
        return values, scales
    if weight.shape[1] % 2:
        raise ValueError("int4 packing needs an even number of input channels")
    low, high = values[:, 0::2], values[:, 1::2]
    return ((low & 0x0F) | (high << 4)).to(torch.uint8), scales


def quantize_weights(weights: dict[str, torch.Tensor], config: ModelConfig, precision: str, group_size: int = 0,
                     progress: bool = False) -> dict[str, torch.Tensor]:
    """Quantizes every decoder-layer linear weight in place, adding float32 `weight_scales`
    (`<name>_scales`: per output channel, or per `group_size` input channels of each); the
    embedding, norms, biases and output layer stay as they are."""
    bits = BITS[precision]
    if bits == 4 and config.hidden_size % 2 + config.q_size % 2 + config.ffn_hidden_size % 2:
        raise GlmEngineError("int4 weight-only needs even input sizes (hidden, heads * kv_channels, ffn)")
    for name in tqdm(quantized_weight_names(config), desc=f"Quantizing to {precision}", disable=not progress):
        weights[name], weights[name + "_scales"] = quantize_symmetric(weights[name], bits, group_size)
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
