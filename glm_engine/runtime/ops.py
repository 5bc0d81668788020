"""The ops a network computes with, chosen once per engine and device: the plain
PyTorch references (glm_engine/kernels/reference.py) or the Triton kernels the
plugin, context-FMHA and weight-only flags ask for. The network's layers take
their op from this table when they are built; a forward never chooses.

Kernels run on a CUDA GPU, or on the CPU under Triton's interpreter
(TRITON_INTERPRET=1, for the kernel tests). Elsewhere an engine built with them
computes the same network with the reference ops, its weight-only layers
dequantized once at load."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable

import torch

from glm_engine import GlmEngineError
from glm_engine.runtime.attention import PagedAttention, ReferenceAttention
from glm_engine.config import BuildConfig, ModelConfig
from glm_engine.kernels import reference
from glm_engine.engine_format.layout import linear_weight_names, weight_shapes
from glm_engine.models import family
from glm_engine.runtime.op_table import Linear, Ops
from glm_engine.quantization import linear_method
from glm_engine.runtime.distributed import TensorParallel

__all__ = ["Ops", "select_ops", "uses_mma_gemm", "shuffle_quantized_weights"]

logger = logging.getLogger("ops")


def runs_kernels(build: BuildConfig, device: torch.device) -> bool:
    """Whether the engine's Triton kernels run on `device`."""
    return build.uses_triton and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def reference_build(build: BuildConfig) -> BuildConfig:
    """`build` with every kernel choice off (sizes, scheduling flags and FP8 storage kept:
    FP8 linears have a reference of their own)."""
    return dataclasses.replace(build, use_gpt_attention_plugin=None, use_layernorm_plugin=None,
                               use_gemm_plugin=None, context_fmha=None, weight_only_precision=None,
                               weight_only_group_size=0, use_inflight_batching=False)


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     weight_scales: torch.Tensor | None, quant_bits: int) -> torch.Tensor:
    return reference.linear(x, weight, bias)


def kernel_linear(gemv: Callable, dequantize: Callable, max_rows: int, cublas_is_faster: Callable) -> Linear:
    """Decode-sized inputs (at most `max_rows` rows) through the skinny-GEMM kernel, but for
    the shapes where cuBLAS measured faster (`cublas_is_faster(rows, n, k, quant_bits)`);
    larger ones through cuBLAS, on the weight dequantized by a kernel when quantized."""

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_scales: torch.Tensor | None,
               quant_bits: int) -> torch.Tensor:
        rows, k = x.shape
        if rows <= max_rows and not cublas_is_faster(rows, weight.shape[0], k, quant_bits):
            return gemv(x, weight, bias, weight_scales, quant_bits)
        if quant_bits:
            weight = dequantize(weight, weight_scales, quant_bits, x.dtype)
        return reference.linear(x, weight, bias)

    return linear


def composed_gated_linear(linear: Linear, swiglu: Callable) -> Linear:
    """gated_linear as two ops: linear, then swiglu."""

    def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     weight_scales: torch.Tensor | None, quant_bits: int) -> torch.Tensor:
        return swiglu(linear(x, weight, bias, weight_scales, quant_bits))

    return gated_linear


def fused_gated_linear(gemm: Callable, max_rows: int, composed: Linear) -> Linear:
    """gated_linear as `gemm(..., swiglu=True)` for at most `max_rows` rows, else `composed`."""

    def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     weight_scales: torch.Tensor | None, quant_bits: int) -> torch.Tensor:
        if x.shape[0] <= max_rows:
            return gemm(x, weight, bias, weight_scales, quant_bits, swiglu=True)
        return composed(x, weight, bias, weight_scales, quant_bits)

    return gated_linear


def select_ops(config: ModelConfig, build: BuildConfig, device: torch.device,
               parallel: TensorParallel | None = None) -> Ops:
    """The op table for one rank's network (`config`: the shape it computes) on `device`
    (kernel modules imported only when chosen); `parallel` gives the collectives when
    the engine has several ranks."""
    kernels = runs_kernels(build, device)
    if build.uses_triton and not kernels:
        logger.info("the engine's plugins are Triton kernels, which need a GPU: running the reference ops on the "
                    "%s%s", device, ", weight-only layers dequantized to " + build.dtype
                    if build.weight_only_precision else "")
        build = reference_build(build)
    if kernels:
        check_triton()
    dtype = build.torch_dtype
    add_rms_norm, swiglu, linear = reference.add_rms_norm, reference.swiglu, reference_linear
    if build.use_layernorm_plugin is not None:
        from glm_engine.kernels import norm, swiglu as swiglu_kernel

        add_rms_norm, swiglu = norm.add_rms_norm, swiglu_kernel.swiglu
    prepare_weights = Ops.prepare_weights
    gated_linear = None
    mma = uses_mma_gemm(config, build, device)
    if mma:
        from glm_engine.kernels import weight_only_mma
    method_linear = linear_method(build).linear_op(device, kernels, weight_only_mma.gemm if mma else None)
    if method_linear is not None:
        linear = method_linear
        if mma:  # decode-sized up projections with their SwiGLU in the GEMM
            gated_linear = fused_gated_linear(weight_only_mma.gemm, weight_only_mma.MAX_ROWS,
                                              composed_gated_linear(linear, swiglu))
    elif mma:
        linear = kernel_linear(weight_only_mma.gemm, weight_only_mma.dequantize, weight_only_mma.MAX_ROWS,
                               lambda *shape: False)
        gated_linear = fused_gated_linear(weight_only_mma.gemm, weight_only_mma.MAX_ROWS,
                                          composed_gated_linear(linear, swiglu))
        bits = linear_method(build).bits
        if bits:  # fp16 weights are read as they are
            prepare_weights = functools.partial(shuffle_quantized_weights, weight_only_mma.shuffle, bits)
    elif build.use_gemm_plugin is not None or linear_method(build).bits:
        from glm_engine.kernels import dequantize, gemv

        linear = kernel_linear(gemv.gemv, dequantize.dequantize, gemv.MAX_ROWS, gemv.cublas_is_faster)
    gated_linear = gated_linear or composed_gated_linear(linear, swiglu)
    if build.use_gpt_attention_plugin is not None:
        attention = PagedAttention(config, dtype, device, build.context_fmha, build.max_sequence_len)
    else:
        attention = ReferenceAttention(config, dtype, device)
    if parallel is None or parallel.world_size == 1:
        return Ops(build, add_rms_norm, linear, gated_linear, attention, prepare_weights=prepare_weights)
    return Ops(build, add_rms_norm, linear, gated_linear, attention, parallel.all_reduce, parallel.gather_vocab,
               prepare_weights)


def uses_mma_gemm(config: ModelConfig, build: BuildConfig, device: torch.device) -> bool:
    """Whether the engine's decoder linears run on the tensor-core GEMM (kernels/weight_only_mma.py):
    an fp16 engine, int8 or int4 with one scale per channel, FP8 (decode-sized steps), or
    unquantized with the GEMM plugin, on a GPU it runs on, every decoder linear tiling into
    it (N % 16, K % 64), and its kernels compiled (else the Triton GEMV, with a log line why)."""
    method = linear_method(build)
    if build.dtype != "float16" or not method.tensor_core_gemm or not (method.name or build.use_gemm_plugin):
        return False
    from glm_engine.kernels import weight_only_mma

    fp8 = method.name == "fp8"
    if not weight_only_mma.runs_on(device) or (fp8 and torch.cuda.get_device_capability(device) < (8, 9)):
        return False
    precision = method.name or "float16"
    fallback = "decode steps dequantize them" if fp8 else "on the Triton GEMV"
    # The decoder linears (quantized or not) as (n, k, with SwiGLU): decode steps run the up projection only
    # through gated_linear.
    shape_of = weight_shapes(config)
    up_projection = family(config.model_type).UP_PROJECTION + ".weight"
    linears = {(*shape_of[name], name.endswith(up_projection)) for name in linear_weight_names(config)}
    shapes = sorted({(n, k) for n, k, _ in linears})
    # (The down projection's K = F tiling by 64 makes the up projection's halves whole 16-output tiles, as its
    # SwiGLU epilogue needs.)
    if not all(weight_only_mma.fits(n, k) for n, k in shapes):
        logger.info("%s linears %s: the tensor-core GEMM tiles 16 outputs by 64 inputs, and the shapes %s do not "
                    "all tile", precision, fallback, shapes)
        return False
    try:
        weight_only_mma.compile_kernels(device, 8 if fp8 else method.bits or 16, linears, fp8)
    except Exception as error:  # NVRTC missing or failing on this box: the fallback still serves
        logger.warning("%s linears %s: the tensor-core GEMM did not compile (%s)", precision, fallback, error)
        return False
    logger.info("%s linears on the tensor-core GEMM (kernels/weight_only_mma.py)", precision)
    return True


def shuffle_quantized_weights(shuffle: Callable, bits: int,
                              weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` with every quantized linear weight (the ones with `<name>_scales`) passed
    through `shuffle(weight, bits)`."""
    return {name: shuffle(tensor, bits) if name + "_scales" in weights else tensor for name, tensor in weights.items()}


def check_triton() -> None:
    try:
        import triton  # noqa: F401
    except ImportError:
        raise GlmEngineError("this engine's plugins are Triton kernels and triton is not installed; "
                             "pip install triton, or run on the CPU (--device cpu)") from None
