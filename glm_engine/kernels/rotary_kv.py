"""Rotary embedding fused with the KV-cache write ("gpt attention plugin") in
Triton: reads the fused QKV projection once, rotates the query and key heads
(interleaved pairs of the first rotary dims), writes the query heads out and
the key/value heads straight into their cache slots. Two kernels: in decode
steps (at most SMALL_STEP tokens) each program takes one head of one token; in
prompts each takes one head of TOKENS_PER_PROGRAM tokens, whose rows it loads
and stores whole (one head of one token a program left long prompts bound by the
number of programs).
Reference: `reference.apply_rotary` plus `KVCache.write`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm_engine.kernels.cache_format import to_cache
from glm_engine.kernels.launch import dependent_launch, wait_for_previous_kernel

TOKENS_PER_PROGRAM = 16  # in steps of more than SMALL_STEP tokens
SMALL_STEP = 8


@triton.jit
def _rotary_kv_kernel(qkv, positions, inv_freq, slot_mapping, query_out, key_cache, value_cache, position_scale,
                      key_scales, value_scales,
                      HEADS: tl.constexpr, GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, CACHE_FP8: tl.constexpr, CACHE_INT8: tl.constexpr,
                      PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = qkv + (token * (HEADS + 2 * GROUPS) + head) * HEAD_DIM
    pairs = tl.arange(0, BLOCK_R)
    pair_ok = pairs < ROT_HALF
    rest = tl.arange(0, BLOCK_P)
    rest_ok = rest < HEAD_DIM - 2 * ROT_HALF
    even = tl.load(row + 2 * pairs, mask=pair_ok, other=0.0)
    odd = tl.load(row + 2 * pairs + 1, mask=pair_ok, other=0.0)
    tail = tl.load(row + 2 * ROT_HALF + rest, mask=rest_ok, other=0.0)
    if head < HEADS + GROUPS:  # query and key heads rotate; value heads do not
        angle = tl.load(positions + token).to(tl.float32) * position_scale * tl.load(inv_freq + pairs,
                                                                                      mask=pair_ok, other=0.0)
        cos, sin = tl.cos(angle), tl.sin(angle)
        even32, odd32 = even.to(tl.float32), odd.to(tl.float32)
        even = (even32 * cos - odd32 * sin).to(even.dtype)
        odd = (odd32 * cos + even32 * sin).to(odd.dtype)
    if head < HEADS:
        destination = query_out + (token * HEADS + head) * HEAD_DIM
        tl.store(destination + 2 * pairs, even, mask=pair_ok)
        tl.store(destination + 2 * pairs + 1, odd, mask=pair_ok)
        tl.store(destination + 2 * ROT_HALF + rest, tail, mask=rest_ok)
    else:
        slot = tl.load(slot_mapping + token).to(tl.int64)
        group = (head - HEADS) % GROUPS
        offset = (slot * GROUPS + group) * HEAD_DIM
        # Its own name: a name bound in both branches must have one type (the query's and the cache's differ).
        cache_row = tl.where(head < HEADS + GROUPS, key_cache + offset, value_cache + offset)
        scales = key_scales
        if CACHE_INT8:
            scales = tl.where(head < HEADS + GROUPS, key_scales, value_scales)
        tl.store(cache_row + 2 * pairs, to_cache(even, scales, group, CACHE_FP8, CACHE_INT8), mask=pair_ok)
        tl.store(cache_row + 2 * pairs + 1, to_cache(odd, scales, group, CACHE_FP8, CACHE_INT8), mask=pair_ok)
        tl.store(cache_row + 2 * ROT_HALF + rest, to_cache(tail, scales, group, CACHE_FP8, CACHE_INT8),
                 mask=rest_ok)


@triton.jit
def _rotary_kv_tile_kernel(qkv, positions, inv_freq, slot_mapping, query_out, key_cache, value_cache, position_scale,
                           key_scales, value_scales, tokens,
                           HEADS: tl.constexpr, GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_PAIRS: tl.constexpr, CACHE_FP8: tl.constexpr,
                           CACHE_INT8: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1)
    token_ok = token < tokens
    dims = tl.arange(0, 2 * BLOCK_PAIRS)
    mask = token_ok[:, None] & (dims < HEAD_DIM)[None, :]
    x = tl.load(qkv + (token * (HEADS + 2 * GROUPS) + head)[:, None] * HEAD_DIM + dims[None, :], mask=mask,
                other=0.0)
    if head < HEADS + GROUPS:  # query and key heads rotate; value heads do not
        pairs = tl.arange(0, BLOCK_PAIRS)
        rotates = pairs < ROT_HALF
        position = tl.load(positions + token, mask=token_ok, other=0).to(tl.float32) * position_scale
        angle = position[:, None] * tl.load(inv_freq + pairs, mask=rotates, other=0.0)[None, :]
        cos = tl.where(rotates[None, :], tl.cos(angle), 1.0)  # dims past the rotary ones pass through
        sin = tl.where(rotates[None, :], tl.sin(angle), 0.0)
        even, odd = tl.split(tl.reshape(x, [BLOCK_T, BLOCK_PAIRS, 2]))
        even32, odd32 = even.to(tl.float32), odd.to(tl.float32)
        x = tl.reshape(tl.join((even32 * cos - odd32 * sin).to(x.dtype), (odd32 * cos + even32 * sin).to(x.dtype)),
                       [BLOCK_T, 2 * BLOCK_PAIRS])
    # One store per destination (a pointer picked among three would hide its alignment: scalar stores).
    if head < HEADS:
        tl.store(query_out + (token * HEADS + head)[:, None] * HEAD_DIM + dims[None, :], x, mask=mask)
    else:
        slot = tl.load(slot_mapping + token, mask=token_ok, other=0).to(tl.int64)
        group = (head - HEADS) % GROUPS
        offsets = (slot * GROUPS + group)[:, None] * HEAD_DIM + dims[None, :]
        if head < HEADS + GROUPS:
            tl.store(key_cache + offsets, to_cache(x, key_scales, group, CACHE_FP8, CACHE_INT8), mask=mask)
        else:
            tl.store(value_cache + offsets, to_cache(x, value_scales, group, CACHE_FP8, CACHE_INT8), mask=mask)


def rotary_kv_write(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, position_scale: float,
                    slot_mapping: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    heads: int, key_scales: torch.Tensor | None = None,
                    value_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Rotated query [N, heads, D] of the packed QKV rows [N, (heads + 2 * groups) * D];
    the rotated keys and the values land in key_cache/value_cache [slots, groups, D]
    at `slot_mapping` (FP8 or INT8 caches: as kv_cache.to_cache_dtype, INT8 with the groups'
    `key_scales`/`value_scales` [groups]). `inv_freq` [rotary_dim // 2] float32 holds the
    rotary frequencies."""
    tokens = qkv.shape[0]
    groups, head_dim = key_cache.shape[1], key_cache.shape[2]
    query = torch.empty(tokens, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    rot_half = inv_freq.shape[0]
    cache = {"CACHE_FP8": key_cache.dtype == torch.float8_e4m3fn, "CACHE_INT8": key_cache.dtype == torch.int8}
    # The kernels index positions and slots densely; a strided view is copied first
    # (the CUDA graphs pass dense rows of their static inputs: no copy).
    inputs = (qkv.contiguous(), positions.contiguous(), inv_freq.contiguous(), slot_mapping.contiguous(), query,
              key_cache, value_cache, position_scale, key_scales, value_scales)
    if tokens <= SMALL_STEP:
        _rotary_kv_kernel[(tokens, heads + 2 * groups)](
            *inputs, HEADS=heads, GROUPS=groups, HEAD_DIM=head_dim, ROT_HALF=rot_half,
            BLOCK_R=triton.next_power_of_2(rot_half), BLOCK_P=max(1, triton.next_power_of_2(head_dim - 2 * rot_half)),
            **cache, **dependent_launch(_rotary_kv_kernel, qkv.device))
    else:
        _rotary_kv_tile_kernel[(triton.cdiv(tokens, TOKENS_PER_PROGRAM), heads + 2 * groups)](
            *inputs, tokens, HEADS=heads, GROUPS=groups, HEAD_DIM=head_dim, ROT_HALF=rot_half,
            BLOCK_T=TOKENS_PER_PROGRAM, BLOCK_PAIRS=max(1, triton.next_power_of_2(head_dim) // 2),
            **cache, **dependent_launch(_rotary_kv_tile_kernel, qkv.device))
    return query
