"""Linear methods: how a decoder linear's weight is stored in an engine and computed.
Each scheme is one class owning its quantization at build, its engine tensors
(names, shapes, dtypes), the network's parameters, which kernels can run it, and
its CPU reference (dequantize). Tensor parallelism cuts a method's tensors as it
cuts the weight: rows with the weight's rows, and, in a row-parallel linear, the
input columns of every 2-D tensor (group scales) while 1-D ones (per output row)
stay whole; a method whose tensors need another cut says so in tensor_parallel.py.
`linear_method(build)` picks the engine's; a new scheme is a new class and a line there."""

from __future__ import annotations

from typing import TYPE_CHECKING

from glm_engine import GlmEngineError

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from glm_engine.config import BuildConfig

    # (x, weight, bias, weight_scales, quant_bits) -> x @ W^T + bias, as runtime/op_table.py's
    Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, int], torch.Tensor]

Shape = tuple[int, ...]
SCALES = "_scales"  # suffix of a quantized weight's scales: `<name>_scales`


class Unquantized:
    """Weights in the engine's dtype, as the checkpoint gave them."""

    name: str | None = None
    bits = 0  # what the linear kernels take as quant_bits: 0 for dense weights
    tensor_core_gemm = True  # the tensor-core GEMM reads fp16 weights as they are (--use_gemm_plugin)

    def tensor_specs(self, name: str, shape: Shape, dtype: torch.dtype) -> dict[str, tuple[Shape, torch.dtype]]:
        """Name -> (shape, dtype) of the engine tensors holding weight `name` [out, in]."""
        return {name: (shape, dtype)}

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Suffix ("" for the weight itself) -> engine tensor, from a dense weight."""
        return {"": weight}

    def dequantize(self, weight: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight that the engine tensors stand for (the CPU reference)."""
        return weight.to(dtype)

    def parameter_shapes(self, out_features: int, in_features: int) -> dict[str, Shape]:
        """The network module's parameters: `weight`, and `weight_scales` when quantized."""
        return {"weight": (out_features, in_features)}

    def linear_op(self, device: torch.device, kernels: bool, decode_gemm: Linear | None) -> Linear | None:
        """The linear op this method computes with on `device` (`kernels`: whether the
        engine's Triton kernels run there; `decode_gemm`: the tensor-core GEMM when it takes
        this engine's linears), or None to let runtime/ops.py choose among the dense and
        weight-only kernels by the plugin flags."""
        return None


class WeightOnly(Unquantized):
    """Weight-only int8, or int4 packed two per byte (uint8, low nibble = even column),
    symmetric, with float32 scales per output channel ([out]) or per `group_size` input
    channels of each ([out, in / group_size]); activations stay in the engine's dtype."""

    def __init__(self, precision: str, group_size: int = 0) -> None:
        if precision not in BITS:
            raise GlmEngineError(f"--weight_only_precision must be int8, int4 or int4_awq, got {precision!r}")
        self.name, self.bits, self.group_size = precision, BITS[precision], group_size
        self.tensor_core_gemm = not group_size  # its dequantizing steps read one scale per channel

    def _scale_shape(self, out_features: int, in_features: int) -> Shape:
        return (out_features, in_features // self.group_size) if self.group_size else (out_features,)

    def tensor_specs(self, name: str, shape: Shape, dtype: torch.dtype) -> dict[str, tuple[Shape, torch.dtype]]:
        import torch

        rows, columns = shape
        stored = ((rows, columns // 2), torch.uint8) if self.bits == 4 else ((rows, columns), torch.int8)
        return {name: stored, name + SCALES: (self._scale_shape(rows, columns), torch.float32)}

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.bits == 4 and weight.shape[1] % 2:
            raise GlmEngineError("int4 weight-only needs even input sizes (hidden, heads * kv_channels, ffn)")
        values, scales = quantize_symmetric(weight, self.bits, self.group_size)
        return {"": values, SCALES: scales}

    def dequantize(self, weight: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        from glm_engine.kernels import reference

        return reference.dequantize(weight, scales, self.bits, dtype)

    def parameter_shapes(self, out_features: int, in_features: int) -> dict[str, Shape]:
        packed = in_features // 2 if self.bits == 4 else in_features
        return {"weight": (out_features, packed), "weight_scales": self._scale_shape(out_features, in_features)}


BITS = {"int8": 8, "int4": 4, "int4_awq": 4}  # int4_awq: int4 weights scaled by AWQ at build (awq.py)


class PerChannelW8A8(Unquantized):
    """One byte a weight (`storage`: a torch dtype's name) with a float32 scale per output
    channel; the subclasses quantize activations per token in prompt-sized steps and own
    their linear op."""

    storage = ""

    def tensor_specs(self, name: str, shape: Shape, dtype: torch.dtype) -> dict[str, tuple[Shape, torch.dtype]]:
        import torch

        return {name: (shape, getattr(torch, self.storage)), name + SCALES: ((shape[0],), torch.float32)}

    def dequantize(self, weight: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        return (weight.float() * scales[:, None]).to(dtype)

    def parameter_shapes(self, out_features: int, in_features: int) -> dict[str, Shape]:
        return {"weight": (out_features, in_features), "weight_scales": (out_features,)}


class Fp8(PerChannelW8A8):
    """FP8 (E4M3) weights with a float32 scale per output channel (max|w| / 448). Prompt-sized
    steps quantize the activations alike per token and run on FP8 tensor cores; decode-sized
    ones, bound by the weight stream, multiply the activations as they are by the FP8 weights
    (kernels/fp8.py). Elsewhere its plain-PyTorch reference, which rounds alike."""

    name = "fp8"
    storage = "float8_e4m3fn"

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        from glm_engine.kernels import reference

        values, scales = reference.quantize_rows_fp8(weight)
        return {"": values, SCALES: scales[:, 0]}

    def linear_op(self, device: torch.device, kernels: bool, decode_gemm: Linear | None) -> Linear:
        from glm_engine.kernels import reference

        if not kernels:
            return reference.fp8_linear
        from glm_engine.kernels import fp8

        fp8.check_device(device)
        return fp8.make_linear(decode_gemm)


class SmoothQuant(PerChannelW8A8):
    """INT8 SmoothQuant: int8 weights with a float32 scale per output channel (max|w| / 127),
    smoothed at build (smoothquant.py); prompt-sized steps quantize the activations to int8
    per token and run on int8 tensor cores, decode-sized ones multiply the activations as
    they are by the int8 weights (kernels/int8_gemm.py). Elsewhere its plain-PyTorch
    reference, which rounds alike."""

    name = "smoothquant"
    storage = "int8"
    tensor_core_gemm = False  # the int8 GEMM of prompts reads the weights row-major, not in the mma layout

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        values, scales = quantize_symmetric(weight, 8)
        return {"": values, SCALES: scales}

    def linear_op(self, device: torch.device, kernels: bool, decode_gemm: Linear | None) -> Linear:
        from glm_engine.kernels import reference

        if not kernels:
            return reference.int8_linear
        from glm_engine.kernels import gemv, int8_gemm

        return int8_gemm.make_linear(gemv.gemv)


def linear_method(build: BuildConfig) -> Unquantized:
    """The linear method of an engine built with `build`."""
    if build.enable_fp8:
        return Fp8()
    if build.smoothquant is not None:
        return SmoothQuant()
    if build.weight_only_precision is None:
        return Unquantized()
    return WeightOnly(build.weight_only_precision, build.weight_only_group_size)


def quantize_symmetric(weight: torch.Tensor, bits: int, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of weight [N, K]: int8 values with scale max|w|/127 (bits 8),
    or int4 values in [-7, 7] with scale max|w|/7 packed two per byte along K (bits 4: low
    nibble = even k). One scale per output channel (`group_size` 0: float32 scales [N]) or
    per `group_size` consecutive input channels of each (float32 scales [N, K / group_size])."""
    import torch

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
