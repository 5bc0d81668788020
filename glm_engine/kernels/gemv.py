"""Skinny GEMM ("gemm plugin" and weight-only GEMM) in Triton for decode steps:
y[M, N] = x[M, K] @ W[N, K]^T (+ bias) with few rows M, where the time is the
weight stream. W may be the model dtype, or int8 / packed int4 with one scale
per output channel (applied to each output at the end) or per group of GROUP
input channels (applied per int32 word of weights as it is unpacked, or to each
tl.dot block, which then spans at most one group), dequantized in registers.

Each program owns BLOCK_N output columns and one of SPLIT_K slices of K, so
every weight byte is read once; with SPLIT_K > 1 the programs write float32
partial sums and a second kernel adds them (no atomics: results do not depend
on the order programs finish). Splitting K gives small matrices enough
programs to keep every SM streaming. For one or two rows the products can be
plain FMAs on CUDA cores (no tensor-core layout shuffles); otherwise tl.dot on
rows padded to 16. `default_config` takes the choice per GPU architecture and shape
from launch_configs.json (launch_configs.py), which benchmarks/tune_gemv.py writes from
its measurements; `cublas_is_faster` the shapes where cuBLAS beat every choice.

int4 packing: byte k//2 of a row holds weight k (even k) in its low nibble and
weight k+1 in its high nibble, as two's-complement 4-bit values. Read as
little-endian int32 words, value i of word j is weight 8j + i (int8: 4j + i),
which the FMA path unpacks with shifts and masks alone (`_unpack_float32`),
loading the next block while it computes one (`_quantized_fma`).

One float16 row on quantized weights on a GPU (a decode step at batch 1) takes
the half2 path (`_quantized_half2`): a few lines of PTX per int32 word turn its
values into fp16 pairs with byte permutes and one three-input logic op (the
value as the low mantissa bits of 1024), scale them to v / 2^(bits-1) and
multiply-add them with the inputs two at a time; the word's sum goes to a
float32 accumulator. Elementwise through and through, it needs no shared
memory, and issues 40% fewer instructions than the FMA path. The PTX does not
run under Triton's interpreter: the CPU tests cover the other paths, the GPU
tests this one.
Reference: `reference.linear` on the dequantized weight."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from glm_engine.kernels import launch_configs
from glm_engine.kernels.launch import compiled, dependent_launch, wait_for_previous_kernel
from glm_engine.kernels.reference import scale_group_size

MAX_ROWS = 16  # the dot path pads x to 16 rows; more rows go to cuBLAS
MAX_FMA_ROWS = 2  # at most this many rows take the FMA path


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    split_k: int
    use_dot: bool
    num_warps: int = 4
    num_stages: int = 3
    half2: bool = False  # one fp16 row on quantized weights in packed half2 PTX (GPU only)


@triton.jit
def _load_weight_tile(weight, columns, column_ok, start, K: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, QUANT: tl.constexpr):
    """[BLOCK_N, BLOCK_K] weights (float, int8, or for int4 int8 holding -8..7) from K offset `start`."""
    if QUANT == 4:
        half = start // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(weight + columns[:, None] * (K // 2) + half[None, :],
                         mask=column_ok[:, None] & (half < K // 2)[None, :], other=0).to(tl.int8)
        low = (packed << 4) >> 4  # sign-extend the low nibble
        high = packed >> 4
        tile = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))
    else:
        ks = start + tl.arange(0, BLOCK_K)
        tile = tl.load(weight + columns[:, None] * K + ks[None, :], mask=column_ok[:, None] & (ks < K)[None, :],
                       other=0)
    return tile


@triton.jit
def _load_words(weight, columns, column_ok, start, end, K: tl.constexpr, BLOCK_K: tl.constexpr, QUANT: tl.constexpr):
    """The quantized weights of columns x [start, start + BLOCK_K) (none at or past `end`) as
    [BLOCK_N, BLOCK_K // (32 // QUANT)] int32 words (K a multiple of 32 // QUANT)."""
    PER_WORD: tl.constexpr = 32 // QUANT
    words_ptr = weight.to(tl.pointer_type(tl.int32), bitcast=True)
    word_ids = start // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
    return tl.load(words_ptr + columns[:, None] * (K // PER_WORD) + word_ids[None, :],
                   mask=column_ok[:, None] & (word_ids < tl.minimum(end, K) // PER_WORD)[None, :], other=0)


@triton.jit
def _unpack_float32(words, word_scales, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QUANT: tl.constexpr,
                    GROUP: tl.constexpr):
    """[BLOCK_N, BLOCK_K] float32 integer values (unscaled) of `_load_words`'s words. A value
    v is turned into a float with bit operations: v + 2^(QUANT-1) (v's sign bit flipped) set
    as the low mantissa bits of 2^23, minus 2^23 + 2^(QUANT-1), with no integer-to-float
    conversion. On the H100 the FMA path measured faster with it than sign-extending and
    converting, tl.dot's fp16 operands slower, so tl.dot keeps `_load_weight_tile`
    (docs/PERFORMANCE.md, "Decode kernels"). With GROUP, each value is
    multiplied by its word's scale (`word_scales`, ignored otherwise)."""
    PER_WORD: tl.constexpr = 32 // QUANT
    shifts = tl.arange(0, PER_WORD) * QUANT
    unsigned = ((words[:, :, None] >> shifts[None, None, :]) & ((1 << QUANT) - 1)) ^ (1 << (QUANT - 1))
    values = (unsigned | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + (1 << (QUANT - 1)))
    if GROUP:
        values *= word_scales[:, :, None]
    return tl.reshape(values, (BLOCK_N, BLOCK_K))


# The half2 path's PTX: one int32 word of packed weights times the fp16 inputs at its K
# positions (x read as int32 words: fp16 pairs), as a float32 sum. The weights become
# v / 2^(bits-1), exact in fp16, so products stay within |x|; a word's 4 (int4) or 2
# (int8) products per half are summed in fp16, then both halves in float32 (an input
# above ~16K in magnitude could overflow the fp16 sum; an fp16 model's activations stay
# below 65504).
# int4, per byte of the word (values v0 low nibble, v1 high nibble):
#   prmt  bytes [b, 0, b, 0]: v0 in the low half's bits 0-3, v1 in the high half's bits 4-7
#   lop3  (t & 0x00F0000F) ^ 0x64806408: keep them, flip their sign bits (v + 8) and set
#         fp16 1024 above them: halves 1024 + (v0 + 8) and 1024 + 16 (v1 + 8)
#   fma   * (1/8, 1/128) + (-129, -9): v0 / 8 and v1 / 8, exactly
# int8: xor 0x80 per byte (v + 128), prmt with 0x64 bytes above each value (1024 + v + 128),
#   fma * 1/128 - 9: v / 128, exactly.
_HALVES_SUM = """mov.b32 {lo, hi}, a;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}"""  # the fp16 pair a's two halves, added in float32, to the output

_INT4_HALF2_DOT = tl.constexpr("""{
.reg .b32 t, v, a, z, s, b;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 z, 0;
mov.b32 s, 0x20003000;
mov.b32 b, 0xC880D808;
prmt.b32 t, $1, z, 0x4040;
lop3.b32 v, t, 0x00F0000F, 0x64806408, 0x6a;
fma.rn.f16x2 v, v, s, b;
mul.rn.f16x2 a, v, $2;
prmt.b32 t, $1, z, 0x4141;
lop3.b32 v, t, 0x00F0000F, 0x64806408, 0x6a;
fma.rn.f16x2 v, v, s, b;
fma.rn.f16x2 a, v, $3, a;
prmt.b32 t, $1, z, 0x4242;
lop3.b32 v, t, 0x00F0000F, 0x64806408, 0x6a;
fma.rn.f16x2 v, v, s, b;
fma.rn.f16x2 a, v, $4, a;
prmt.b32 t, $1, z, 0x4343;
lop3.b32 v, t, 0x00F0000F, 0x64806408, 0x6a;
fma.rn.f16x2 v, v, s, b;
fma.rn.f16x2 a, v, $5, a;
""" + _HALVES_SUM)

_INT8_HALF2_DOT = tl.constexpr("""{
.reg .b32 u, p, q, a, m, s, b;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 m, 0x64646464;
mov.b32 s, 0x20002000;
mov.b32 b, 0xC880C880;
xor.b32 u, $1, 0x80808080;
prmt.b32 p, u, m, 0x5150;
prmt.b32 q, u, m, 0x5352;
fma.rn.f16x2 p, p, s, b;
fma.rn.f16x2 q, q, s, b;
mul.rn.f16x2 a, p, $2;
fma.rn.f16x2 a, q, $3, a;
""" + _HALVES_SUM)


@triton.jit
def _half2_dot(words, x_words, word_ids, ok, QUANT: tl.constexpr):
    """[BLOCK_N, words] float32: each word's weights (as v / 2^(QUANT-1)) times x at its K positions."""
    if QUANT == 4:
        x0 = tl.load(x_words + word_ids * 4, mask=ok, other=0)[None, :]
        x1 = tl.load(x_words + word_ids * 4 + 1, mask=ok, other=0)[None, :]
        x2 = tl.load(x_words + word_ids * 4 + 2, mask=ok, other=0)[None, :]
        x3 = tl.load(x_words + word_ids * 4 + 3, mask=ok, other=0)[None, :]
        products = tl.inline_asm_elementwise(_INT4_HALF2_DOT, "=r,r,r,r,r,r", [words, x0, x1, x2, x3],
                                             dtype=tl.float32, is_pure=True, pack=1)
    else:
        x0 = tl.load(x_words + word_ids * 2, mask=ok, other=0)[None, :]
        x1 = tl.load(x_words + word_ids * 2 + 1, mask=ok, other=0)[None, :]
        products = tl.inline_asm_elementwise(_INT8_HALF2_DOT, "=r,r,r,r", [words, x0, x1],
                                             dtype=tl.float32, is_pure=True, pack=1)
    return products


@triton.jit
def _quantized_half2(x, weight, weight_scales, columns, column_ok, split, K: tl.constexpr, K_PER_SPLIT: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr):
    """[1, BLOCK_N] sums over this split's K of one fp16 row x times the quantized weights,
    unscaled (scaled with group scales) but for the 2^(QUANT-1) that `_half2_dot` divides by. Elementwise through
    and through (no reshape), so nothing waits on shared memory; the next block's words
    are loaded before this block's are used."""
    PER_WORD: tl.constexpr = 32 // QUANT
    first = split * K_PER_SPLIT
    end = first + K_PER_SPLIT
    last_word = tl.minimum(end, K) // PER_WORD
    x_words = x.to(tl.pointer_type(tl.int32), bitcast=True)
    acc = tl.zeros([BLOCK_N, BLOCK_K // PER_WORD], tl.float32)
    words = _load_words(weight, columns, column_ok, first, end, K, BLOCK_K, QUANT)
    for start in range(first, end, BLOCK_K):
        next_words = _load_words(weight, columns, column_ok, start + BLOCK_K, end, K, BLOCK_K, QUANT)
        word_ids = start // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
        products = _half2_dot(words, x_words, word_ids, word_ids < last_word, QUANT)
        if GROUP:  # each word's float32 sum times its group's scale
            products *= _word_scales(weight_scales, columns, column_ok, word_ids, K, GROUP, PER_WORD)
        acc += products
        words = next_words
    return tl.sum(acc, axis=1)[None, :]


@triton.jit
def _word_scales(weight_scales, columns, column_ok, word_ids, K: tl.constexpr, GROUP: tl.constexpr,
                 PER_WORD: tl.constexpr):
    """[BLOCK_N, words] float32: the scale of each int32 word of quantized weights, with one scale
    per GROUP input channels ([N, K / GROUP] scales; GROUP >= 32, so a word lies in one group).
    Loaded in the words' own layout, one load per word (neighbours share an address, served
    by L1): a load per weight measured several times slower on the H100."""
    return tl.load(weight_scales + columns[:, None] * (K // GROUP) + (word_ids * PER_WORD // GROUP)[None, :],
                   mask=column_ok[:, None] & (word_ids < K // PER_WORD)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _block_scales(weight_scales, columns, column_ok, word_ids, K: tl.constexpr, GROUP: tl.constexpr,
                  PER_WORD: tl.constexpr):
    """`_word_scales` with group scales; without, ones that nothing reads (no load)."""
    if GROUP:
        scales = _word_scales(weight_scales, columns, column_ok, word_ids, K, GROUP, PER_WORD)
    else:
        scales = tl.full([columns.shape[0], word_ids.shape[0]], 1.0, tl.float32)
    return scales


@triton.jit
def _quantized_fma(x, weight, weight_scales, columns, column_ok, split, row_ids, row_ok, K: tl.constexpr,
                   K_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   QUANT: tl.constexpr, GROUP: tl.constexpr):
    """[BLOCK_M, BLOCK_N] sums over this split's K of x times the quantized weights, as FMAs:
    unscaled with per-channel scales (the caller applies them), scaled with group scales.
    The next block's words and inputs are loaded before this block is unpacked: the
    unpacking waits on a shared-memory exchange (the reshape), and without the prefetch
    every block would wait out a whole memory latency."""
    PER_WORD: tl.constexpr = 32 // QUANT
    first = split * K_PER_SPLIT
    end = first + K_PER_SPLIT
    acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    word_range = tl.arange(0, BLOCK_K // PER_WORD)
    words = _load_words(weight, columns, column_ok, first, end, K, BLOCK_K, QUANT)
    scales = _block_scales(weight_scales, columns, column_ok, first // PER_WORD + word_range, K, GROUP, PER_WORD)
    ks = first + tl.arange(0, BLOCK_K)
    xs = tl.load(x + row_ids[:, None] * K + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
    for start in range(first, end, BLOCK_K):
        next_words = _load_words(weight, columns, column_ok, start + BLOCK_K, end, K, BLOCK_K, QUANT)
        next_scales = _block_scales(weight_scales, columns, column_ok, (start + BLOCK_K) // PER_WORD + word_range,
                                    K, GROUP, PER_WORD)
        next_ks = start + BLOCK_K + tl.arange(0, BLOCK_K)
        next_xs = tl.load(x + row_ids[:, None] * K + next_ks[None, :],
                          mask=row_ok[:, None] & (next_ks < tl.minimum(end, K))[None, :], other=0.0)
        values = _unpack_float32(words, scales, BLOCK_N, BLOCK_K, QUANT, GROUP)
        acc3 += xs.to(tl.float32)[:, None, :] * values[None, :, :]
        words = next_words
        scales = next_scales
        xs = next_xs
    return tl.sum(acc3, axis=2)


@triton.jit
def _gemv_kernel(x, weight, weight_scales, bias, out, partial, rows, N: tl.constexpr, K: tl.constexpr,
                 K_PER_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
                 PRECISION: tl.constexpr, HALF2: tl.constexpr, GROUP: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    columns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    column_ok = columns < N
    split = tl.program_id(1)
    row_ids = tl.arange(0, BLOCK_M)
    row_ok = row_ids < rows
    if HALF2:
        acc = _quantized_half2(x, weight, weight_scales, columns, column_ok, split, K, K_PER_SPLIT, BLOCK_N, BLOCK_K,
                               QUANT, GROUP)
        acc *= 1 << (QUANT - 1)
    elif not USE_DOT and QUANT != 0:
        acc = _quantized_fma(x, weight, weight_scales, columns, column_ok, split, row_ids, row_ok, K, K_PER_SPLIT,
                             BLOCK_M, BLOCK_N, BLOCK_K, QUANT, GROUP)
    else:
        if USE_DOT:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        else:
            # Elementwise accumulation; one reduction over K at the end instead of one per step.
            acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
        for start in range(split * K_PER_SPLIT, split * K_PER_SPLIT + K_PER_SPLIT, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            xs = tl.load(x + row_ids[:, None] * K + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
            w = _load_weight_tile(weight, columns, column_ok, start, K, BLOCK_N, BLOCK_K, QUANT)
            if GROUP:  # only on tl.dot, with BLOCK_K <= GROUP: the block lies in one group
                group_scales = tl.load(weight_scales + columns * (K // GROUP) + start // GROUP, mask=column_ok,
                                       other=0.0).to(tl.float32)
                acc += tl.dot(xs, tl.trans(w.to(xs.dtype)), input_precision=PRECISION) * group_scales[None, :]
            elif USE_DOT:
                acc += tl.dot(xs, tl.trans(w.to(xs.dtype)), input_precision=PRECISION)
            else:
                acc3 += xs.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        if not USE_DOT:
            acc = tl.sum(acc3, axis=2)
    mask = row_ok[:, None] & column_ok[None, :]
    if SPLIT_K == 1:  # the whole K here: finish in place, no epilogue kernel
        if QUANT != 0 and GROUP == 0:
            acc *= tl.load(weight_scales + columns, mask=column_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias + columns, mask=column_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out + row_ids[:, None] * N + columns[None, :], acc.to(out.dtype.element_ty), mask=mask)
    else:
        tl.store(partial + (split * rows + row_ids)[:, None] * N + columns[None, :], acc, mask=mask)


@triton.jit
def _epilogue_kernel(partial, weight_scales, bias, out, total, N: tl.constexpr, SPLIT_K: tl.constexpr,
                     HAS_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out = (sum of the SPLIT_K partial sums) * scale + bias, in out's dtype."""
    wait_for_previous_kernel(PDL)
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = index < total
    acc = tl.zeros([BLOCK], tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(partial + split * total + index, mask=ok, other=0.0)
    columns = index % N
    if HAS_SCALES:
        acc *= tl.load(weight_scales + columns, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + columns, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + index, acc.to(out.dtype.element_ty), mask=ok)


_PATHS = ("fma", "dot", "half2")  # a choice's "path" in launch_configs.json


def config_from_choice(choice: dict) -> GemvConfig:
    """The GemvConfig of a launch_configs.json choice."""
    if choice["path"] not in _PATHS:
        raise ValueError(f"a gemv choice's path is one of {_PATHS}, got {choice['path']!r}")
    return GemvConfig(choice["block_n"], choice["block_k"], choice["split_k"], use_dot=choice["path"] == "dot",
                      num_warps=choice["num_warps"], num_stages=choice["num_stages"], half2=choice["path"] == "half2")


def choice_of(config: GemvConfig, cublas: bool = False) -> dict:
    """`config` as a launch_configs.json choice; `cublas`: cuBLAS beat it (the op table then takes cuBLAS)."""
    path = "half2" if config.half2 else "dot" if config.use_dot else "fma"
    choice = {"block_n": config.block_n, "block_k": config.block_k, "split_k": config.split_k, "path": path,
              "num_warps": config.num_warps, "num_stages": config.num_stages}
    return {**choice, "cublas": True} if cublas else choice


@functools.cache
def _tuned(arch: str, rows: int, n: int, k: int, quant_bits: int, half2: bool, grouped: bool) -> dict:
    return launch_configs.choice("gemv", arch, rows, n=n, k=k, bits=quant_bits, grouped=grouped, half2=half2)


def default_config(rows: int, n: int, k: int, quant_bits: int, half2_ok: bool = False,
                   grouped: bool = False, arch: str | None = None) -> GemvConfig:
    """The tuned choice for `rows` rows on an [n, k] weight of `quant_bits` (0: unquantized)
    on `arch` (None: the current GPU's; off the GPU the table's default): launch_configs.json's
    entry for the architecture and shape, else its default (launch_configs.py).
    `half2_ok`: one fp16 row on quantized weights on a GPU, kernels compiled (the half2
    path may run); `grouped`: scales per group of input channels. Where K is no whole
    number of int32 words of quantized weights, the FMA and half2 paths cannot read them:
    the tl.dot choice of MAX_ROWS rows serves."""
    arch = arch or launch_configs.architecture()
    whole_words = quant_bits == 0 or k % (32 // quant_bits) == 0
    half2 = half2_ok and rows == 1 and quant_bits != 0 and whole_words
    grouped = grouped and quant_bits != 0
    config = config_from_choice(_tuned(arch, rows, n, k, quant_bits, half2, grouped))
    if not config.use_dot and not whole_words:
        config = config_from_choice(_tuned(arch, MAX_ROWS, n, k, quant_bits, False, grouped))
    return config


def cublas_is_faster(rows: int, n: int, k: int, quant_bits: int, arch: str | None = None) -> bool:
    """Whether cuBLAS beat every config of this kernel for `rows` rows on an [n, k] weight of
    `quant_bits` on `arch` (None: the current GPU's): the "cublas" mark of the tuned choice
    (launch_configs.json). Never above MAX_ROWS rows, which this kernel does not take."""
    if rows > MAX_ROWS:
        return False
    choice = _tuned(arch or launch_configs.architecture(), rows, n, k, quant_bits, False, False)
    return choice.get("cublas", False)


_COMPILED = compiled(_gemv_kernel)


def _half2_possible(x: torch.Tensor, quant_bits: int) -> bool:
    """The half2 path is PTX: one float16 row on int8/int4 weights on a CUDA GPU, kernels
    compiled (not interpreted)."""
    return _COMPILED and x.shape[0] == 1 and x.dtype == torch.float16 and x.is_cuda and quant_bits != 0


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         weight_scales: torch.Tensor | None = None, quant_bits: int = 0,
         config: GemvConfig | None = None) -> torch.Tensor:
    """x [M <= 16, K] @ W^T -> [M, N] in x's dtype. W: [N, K] in x's dtype (quant_bits 0),
    int8 [N, K] (8) or packed uint8 [N, K // 2] (4) with `weight_scales` [N], or [N, K / group]
    for one scale per group of input channels. `config` overrides the tuned choice (tests
    use it to cover every path)."""
    x = x.contiguous()
    rows, k = x.shape
    n = weight.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {rows}")
    group = scale_group_size(weight_scales, k) if weight_scales is not None else 0
    config = config or default_config(rows, n, k, quant_bits, _half2_possible(x, quant_bits), grouped=group > 0,
                                      arch=launch_configs.architecture(x.device))
    if quant_bits and not config.use_dot and k % (32 // quant_bits):
        raise ValueError(f"the FMA and half2 paths read int{quant_bits} weights as int32 words: K must be a multiple "
                         f"of {32 // quant_bits}, got {k}")
    if config.half2 and not _half2_possible(x, quant_bits):
        raise ValueError("the half2 path takes one float16 row on int8/int4 weights on a CUDA GPU, got "
                         f"{rows} {x.dtype} row(s) on {x.device} with quant_bits {quant_bits}")
    if config.half2 and x.data_ptr() % 4:
        x = x.clone()  # it reads x as int32 words: a row starting at an odd element would fault
    block_k = min(config.block_k, max(32, triton.next_power_of_2(k)))
    if group and config.use_dot:
        block_k = min(block_k, group)  # one scale per column for each tl.dot block
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    partial = torch.empty(split_k, rows, n, dtype=torch.float32, device=x.device) if split_k > 1 else out
    _gemv_kernel[(triton.cdiv(n, config.block_n), split_k)](
        x, weight, weight_scales, bias, out, partial, rows, N=n, K=k, K_PER_SPLIT=k_per_split,
        BLOCK_M=16 if config.use_dot else triton.next_power_of_2(rows), BLOCK_N=config.block_n, BLOCK_K=block_k,
        QUANT=quant_bits, HAS_BIAS=bias is not None, SPLIT_K=split_k, USE_DOT=config.use_dot,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", HALF2=config.half2, GROUP=group,
        num_warps=config.num_warps,
        num_stages=config.num_stages, **dependent_launch(_gemv_kernel, x.device))
    if split_k == 1:
        return out
    block = 1024
    _epilogue_kernel[(triton.cdiv(rows * n, block),)](
        partial, weight_scales, bias, out, rows * n, N=n, SPLIT_K=split_k,
        HAS_SCALES=weight_scales is not None and not group,
        HAS_BIAS=bias is not None, BLOCK=block, **dependent_launch(_epilogue_kernel, x.device))
    return out
