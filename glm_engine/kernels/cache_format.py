"""How the attention kernels store and read K/V in a quantized cache, inside Triton
kernels: FP8 E4M3 (saturated to +-448, rounded to nearest even, unscaled) or INT8 (a
scale per layer, K/V and group, round half to even within +-127), rounded by
quantize.py's helpers.
Reference: `runtime/kv_cache.py` to_cache_dtype and from_cache_dtype."""

from __future__ import annotations

import triton
import triton.language as tl

from glm_engine.kernels.quantize import round_to_e4m3, round_to_int8


@triton.jit
def to_cache(x, scales, group, CACHE_FP8: tl.constexpr, CACHE_INT8: tl.constexpr):
    """Values `x` of K/V group `group` as the cache stores them (as they are for an
    unquantized cache; `scales` [groups] float32 for INT8, else unused)."""
    if CACHE_FP8:
        x = round_to_e4m3(tl.minimum(tl.maximum(x.to(tl.float32), -448.0), 448.0))
    if CACHE_INT8:
        x = round_to_int8(tl.math.div_rn(x.to(tl.float32), tl.load(scales + group)))
    return x


@triton.jit
def from_cache(x, scales, group, dtype: tl.constexpr, CACHE_INT8: tl.constexpr):
    """Cached values `x` of K/V group `group` as `dtype` (INT8: times the group's scale)."""
    if CACHE_INT8:
        x = x.to(tl.float32) * tl.load(scales + group)
    return x.to(dtype)
