"""Weight-only GEMM for decode steps (1-16 fp16 rows on int8 or int4 weights with one
scale per output channel, or on fp16 weights) on tensor cores: a CUDA kernel
(weight_only_mma.cu) compiled at load with NVRTC through torch.

The Triton GEMV (gemv.py) spends ~20 instructions on each int32 word of int4 weights
(8 values), and at one row its int4 kernels are bound by that, not by memory (as fast
with the weights in L2 as from HBM: docs/PERFORMANCE.md). Here one
`mma.m16n8k16` takes a warp's 256 weights: each lane turns its 8 into the four fp16
pairs of its A fragment with bit operations (lop3 on int4 nibbles, prmt on int8
bytes) and one exact fp16 subtract or FMA per pair, and the tensor core multiplies and
accumulates in float32. x rows are the B fragment's columns, so 1 to 8 rows (16 with a
second mma) cost the same weight stream: at 8 rows it streams each weight once where
the Triton GEMV is bound by its instructions (docs/PERFORMANCE.md). On Hopper it launches with programmatic dependent launch, as
the Triton kernels do, and loads its first weights before it waits.

That needs the weights in the fragments' order, written once at load by `shuffle`
(same shape and dtype as the int8 [N, K] or packed int4 [N, K // 2] weight, so the
network's parameters keep their shapes): see weight_only_mma.cu's header. `unshuffle`
is its inverse. It serves fp16 engines where every decoder linear has N % 16 == 0 and
K % 64 == 0 (ChatGLM2-6B, also split over 2 ranks); the op table (ops.select_ops)
chooses it for the whole engine or not at all, and larger inputs (prefill) go through
`dequantize` and cuBLAS. fp16 weights (quant_bits 0) are read as they are, row-major:
the same permutation of each chunk's input channels makes a lane's two 32-byte row
pieces its A fragments, so cuBLAS (prefill) and this kernel share one copy; the op table
takes it for fp16 engines built with the GEMM plugin. `gemm(..., swiglu=True)` computes the fused up
projection's silu(gate) * up in the same kernel: a block takes gate tile t and up tile
t + N/32. `launch_config` takes each shape's warps and loads per GPU architecture from
launch_configs.json (launch_configs.py), which `benchmarks/tune_gemv.py --mma` writes from
its measurements. Reference: `reference.linear` on `reference.dequantize(unshuffle(weight,
bits), ...)`, or on the fp16 weight."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterable
from pathlib import Path

import torch

from glm_engine.kernels import launch_configs

MAX_ROWS = 16  # two row blocks of the mma's 8 columns
_SOURCE = Path(__file__).with_suffix(".cu")


def runs_on(device: torch.device) -> bool:
    """A CUDA GPU with fp16 mma.sync (compute capability 8.0 or later), a torch that
    compiles CUDA source at run time (torch.cuda._compile_kernel, NVRTC), and a driver
    with cuLaunchKernelEx (CUDA 12), which launches it."""
    return device.type == "cuda" and hasattr(torch.cuda, "_compile_kernel") \
        and torch.cuda.get_device_capability(device) >= (8, 0) and _driver() is not None \
        and hasattr(_driver(), "cuLaunchKernelEx")


def fits(n: int, k: int) -> bool:
    """Whether an [n, k] weight tiles into the kernel's 16-channel tiles and 64-channel chunks."""
    return n % 16 == 0 and k % 64 == 0


def _input_channels(weight: torch.Tensor, bits: int) -> int:
    return weight.shape[1] * (2 if bits == 4 else 1)


def shuffle(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """An int8 [N, K] or packed int4 [N, K // 2] weight (byte k // 2: weight k in the low
    nibble for even k, two's complement) in the mma layout, same shape and dtype."""
    n, k = weight.shape[0], _input_channels(weight, bits)
    if not fits(n, k):
        raise ValueError(f"the mma layout tiles 16 output by 64 input channels, got a {n}x{k} weight")
    if bits == 8:
        # rows t*16 + h*8 + g, inputs q*64 + 16c + 4j + i -> [t, q, g, c, j, word h, byte i]
        unsigned = weight.view(torch.uint8) ^ 0x80  # v + 128
        unsigned = unsigned.view(n // 16, 2, 8, k // 64, 4, 4, 4).permute(0, 3, 2, 4, 5, 1, 6)
        return unsigned.reshape(n, k).view(torch.int8)
    nibbles = torch.stack([weight & 0xF, weight >> 4], dim=-1).view(n, k) ^ 8  # v + 8
    # rows t*16 + h*8 + g, inputs q*64 + 16c + 4j + 2kb + ka -> [t, q, g, c, j, word nibble ka*4 + kb*2 + h]
    nibbles = nibbles.view(n // 16, 2, 8, k // 64, 4, 4, 2, 2).permute(0, 3, 2, 4, 5, 7, 6, 1).reshape(-1, 4, 2)
    return (nibbles[..., 0] | (nibbles[..., 1] << 4)).view(n, k // 2)


def unshuffle(shuffled: torch.Tensor, bits: int) -> torch.Tensor:
    """`shuffle`'s inverse."""
    n, k = shuffled.shape[0], _input_channels(shuffled, bits)
    if bits == 8:
        unsigned = shuffled.view(torch.uint8).view(n // 16, k // 64, 8, 4, 4, 2, 4).permute(0, 5, 2, 1, 3, 4, 6)
        return (unsigned.reshape(n, k) ^ 0x80).view(torch.int8)
    nibbles = torch.stack([shuffled & 0xF, shuffled >> 4], dim=-1)
    nibbles = nibbles.view(n // 16, k // 64, 8, 4, 4, 2, 2, 2).permute(0, 7, 2, 1, 3, 4, 6, 5).reshape(n, k) ^ 8
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)


@functools.cache
def _pdl(device_index: int) -> bool:
    """Programmatic dependent launch: Hopper or later."""
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


@functools.cache
def _driver() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:  # not Linux: runs_on is False, the Triton GEMV serves
        return None


@functools.cache
def _compiled(device_index: int, name: str, **defines: int):
    """One kernel of weight_only_mma.cu compiled for (and loaded on) one GPU."""
    options = [f"-D{key}={value}" for key, value in {**defines, "PDL": int(_pdl(device_index))}.items()]
    with torch.cuda.device(device_index):
        return torch.cuda._compile_kernel(_SOURCE.read_text(), name, nvcc_options=options)


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_memory", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attributes", ctypes.POINTER(_LaunchAttribute)),
                ("attribute_count", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def _argument(value: torch.Tensor | None | int) -> ctypes.c_void_p | ctypes.c_int:
    if value is None or isinstance(value, torch.Tensor):
        return ctypes.c_void_p(None if value is None else value.data_ptr())
    return ctypes.c_int(value)


def _launch(kernel, device_index: int, grid: int, threads: int, args: list, dependent: bool = True) -> None:
    """Launches on the current stream through cuLaunchKernelEx (tensors as pointers, None
    as a null pointer, ints as ints). A `dependent` kernel (one that waits in
    griddepcontrol.wait before it touches what other kernels write) launches with
    programmatic dependent launch where `_pdl`, as the Triton kernels around it do: it
    may start while the kernel ahead finishes."""
    values = [_argument(arg) for arg in args]
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(value), ctypes.c_void_p) for value in values])
    attribute = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attribute.value[0] = 1
    pdl = dependent and _pdl(device_index)
    config = _LaunchConfig(grid=(ctypes.c_uint * 3)(grid, 1, 1), block=(ctypes.c_uint * 3)(threads, 1, 1),
                           shared_memory=0, stream=torch.cuda.current_stream().cuda_stream,
                           attributes=ctypes.pointer(attribute) if pdl else None, attribute_count=int(pdl))
    result = _driver().cuLaunchKernelEx(ctypes.byref(config), kernel.func, pointers, None)
    if result != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA error {result}")


def launch_config(n: int, k: int, bits: int = 4, swiglu: bool = False,
                  arch: str | None = None) -> tuple[int, int, int]:
    """(warps a block, chunks a warp loads at once, whether it loads the next ones first) for
    an [n, k] weight of `bits` (16: fp16), with the SwiGLU epilogue or not, on `arch` (None:
    the current GPU's): launch_configs.json's entry for the architecture and shape, else its
    default (launch_configs.py)."""
    choice = launch_configs.choice("weight_only_mma", arch or launch_configs.architecture(), n=n, k=k, bits=bits,
                                   swiglu=swiglu)
    return choice["warps"], choice["unroll"], choice["pipe"]


# Every value launch_config can return, in table order (the GPU tests run each one).
LAUNCH_CONFIGS = tuple(dict.fromkeys((choice["warps"], choice["unroll"], choice["pipe"])
                                     for choice in launch_configs.choices("weight_only_mma")))


def compile_kernels(device: torch.device, bits: int, linears: Iterable[tuple[int, int, bool]],
                    fp8: bool = False) -> None:
    """Compiles for `device` the variants `gemm` launches for these linears ((n, k, swiglu)
    each; bits 4, 8 (int8, or FP8 with `fp8`), or 16 for fp16 weights) at one and two row
    blocks, and the dequantize kernel of int8/int4: NVRTC errors surface here, at load, not
    while decode graphs are captured."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    arch = launch_configs.architecture(device)
    for n, k, swiglu in set(linears):
        warps, unroll, pipe = launch_config(n, k, bits, swiglu, arch)
        for row_blocks in (1, 2):
            _gemm_kernel(index, bits, warps, unroll, pipe, row_blocks, 2 if swiglu else 1, fp8)
    if bits != 16 and not fp8:
        _dequantize_kernel(index, bits)


def _gemm_kernel(device_index: int, bits: int, warps: int, unroll: int, pipe: int, row_blocks: int, tiles: int,
                 fp8: bool = False):
    return _compiled(device_index, "weight_only_mma_gemm", BITS=bits, WARPS=warps, UNROLL=unroll, PIPE=pipe,
                     ROW_BLOCKS=row_blocks, TILES=tiles, FP8=int(fp8))


def _dequantize_kernel(device_index: int, bits: int):
    return _compiled(device_index, "weight_only_mma_dequantize", BITS=bits, WARPS=1, UNROLL=1, PIPE=0,
                     ROW_BLOCKS=1, TILES=1)


def swiglu_fits(n: int) -> bool:
    """Whether `gemm(..., swiglu=True)` takes an up projection of n outputs: both halves
    whole 16-channel tiles."""
    return n % 32 == 0


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_scales: torch.Tensor | None,
         quant_bits: int, config: tuple[int, int, int] | None = None, swiglu: bool = False) -> torch.Tensor:
    """x [M <= 16, K] fp16 @ W^T * scales (+ bias) -> [M, N] fp16, W an mma-layout int8 or
    int4 weight or a row-major FP8 E4M3 one (any quant_bits) with float32 `weight_scales`
    [N], or (quant_bits 0) an fp16 [N, K] weight as it is, without scales (the op table's
    linear signature); with `swiglu`, silu(a) * b of
    that [a, b] -> [M, N / 2] (the fused up projection's SwiGLU, in the same kernel).
    `config` (one of LAUNCH_CONFIGS) overrides `launch_config` (tests cover each)."""
    rows, k = x.shape
    n = weight.shape[0]
    fp8 = weight.dtype == torch.float8_e4m3fn
    per_channel = weight_scales is not None and weight_scales.dim() == 1
    quantized_ok = (quant_bits in (4, 8) or fp8) and per_channel
    fp16_ok = quant_bits == 0 and weight.dtype == torch.float16 and weight_scales is None
    if not (quantized_ok or fp16_ok) or x.dtype != torch.float16 or rows > MAX_ROWS:
        raise ValueError(f"the mma GEMM takes up to {MAX_ROWS} fp16 rows on int8/int4/FP8 weights with one scale per "
                         f"channel or on fp16 weights, got {rows} {x.dtype} rows, {quant_bits}-bit {weight.dtype} "
                         f"weights, scales {None if weight_scales is None else tuple(weight_scales.shape)}")
    if (quant_bits == 0 or fp8) and (not weight.is_contiguous() or weight.data_ptr() % 16):
        raise ValueError("the mma GEMM reads fp16 and FP8 weights row-major, 16 bytes at a time: the weight must be "
                         "contiguous and 16-byte aligned")
    if swiglu and not swiglu_fits(n):
        raise ValueError(f"the SwiGLU epilogue pairs 16-channel tiles of both halves: {n} outputs are not 32 x m")
    x = x.contiguous()
    if x.data_ptr() % 16:
        x = x.clone()  # read 16 bytes at a time
    bits = 8 if fp8 else quant_bits or 16
    warps, unroll, pipe = config or launch_config(n, k, bits, swiglu, launch_configs.architecture(x.device))
    tiles = 2 if swiglu else 1
    kernel = _gemm_kernel(x.device.index, bits, warps, unroll, pipe, 1 if rows <= 8 else 2, tiles, fp8)
    out = torch.empty(rows, n // tiles, dtype=torch.float16, device=x.device)
    _launch(kernel, x.device.index, n // (16 * tiles), 32 * warps,
            [weight, x, weight_scales, bias, out, rows, n, k, int(bias is not None)])
    return out


def dequantize(weight: torch.Tensor, weight_scales: torch.Tensor, quant_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense fp16 weight [N, K] of an mma-layout weight (the op table's dequantize signature)."""
    if quant_bits not in (4, 8) or dtype != torch.float16:
        raise ValueError(f"the mma layout dequantizes int8/int4 to float16, got {quant_bits} bits to {dtype}")
    n, k = weight.shape[0], _input_channels(weight, quant_bits)
    out = torch.empty(n, k, dtype=torch.float16, device=weight.device)
    words = n * k * quant_bits // 32
    _launch(_dequantize_kernel(weight.device.index, quant_bits), weight.device.index, (words + 255) // 256, 256,
            [weight, weight_scales, out, n, k], dependent=False)
    return out
