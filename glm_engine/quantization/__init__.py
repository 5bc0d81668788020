"""Quantization of an engine's decoder linears: the linear methods (methods.py) and
their application to a whole weight dict at build and, inverted, at load."""

from __future__ import annotations

from typing import TYPE_CHECKING

from glm_engine.quantization.methods import (BITS, SCALES, Fp8, SmoothQuant, Unquantized, WeightOnly,
                                             linear_method, quantize_symmetric)

if TYPE_CHECKING:
    import torch

__all__ = ["BITS", "SCALES", "Fp8", "SmoothQuant", "Unquantized", "WeightOnly", "linear_method",
           "quantize_symmetric", "quantize_weights", "dequantize_weights"]


def quantize_weights(weights: dict[str, torch.Tensor], linear_names: list[str], method: Unquantized,
                     progress: bool = False) -> dict[str, torch.Tensor]:
    """Quantizes each weight of `linear_names` in place with `method`, adding its extra
    tensors (`<name>_scales`); the embedding, norms, biases and output layer stay as they are."""
    from tqdm import tqdm

    for name in tqdm(linear_names, desc=f"Quantizing to {method.name}", disable=not progress or method.name is None):
        for suffix, tensor in method.quantize(weights[name]).items():
            weights[name + suffix] = tensor
    return weights


def dequantize_weights(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Weights with every quantized linear replaced by the dense weight it stands for,
    in `dtype` (its method recognized by its storage); the others unchanged."""
    dense = {}
    for name, tensor in weights.items():
        if name.endswith(SCALES):
            continue
        scales = weights.get(name + SCALES)
        if scales is None:
            dense[name] = tensor
        else:
            dense[name] = _method_of(tensor).dequantize(tensor, scales, dtype)
    return dense


def _method_of(tensor: torch.Tensor) -> Unquantized:
    """The linear method of a quantized weight, from its storage (int4 packs into uint8;
    the group size is read off the scales' shape)."""
    import torch

    if tensor.dtype == torch.float8_e4m3fn:
        return Fp8()
    return WeightOnly("int4" if tensor.dtype == torch.uint8 else "int8")
