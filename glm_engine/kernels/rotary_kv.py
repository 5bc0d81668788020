"""Rotary embedding fused with the KV-cache write ("gpt attention plugin") in
Triton: reads the fused QKV projection once, rotates the query and key heads
(interleaved pairs of the first rotary dims), writes the query heads out and
the key/value heads straight into their cache slots.
Reference: `reference.apply_rotary` plus `KVCache.write`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm_engine.kernels.launch import dependent_launch, wait_for_previous_kernel


@triton.jit
def _rotary_kv_kernel(qkv, positions, inv_freq, slot_mapping, query_out, key_cache, value_cache, position_scale,
                      HEADS: tl.constexpr, GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
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
    else:
        slot = tl.load(slot_mapping + token).to(tl.int64)
        offset = (slot * GROUPS + (head - HEADS) % GROUPS) * HEAD_DIM
        destination = tl.where(head < HEADS + GROUPS, key_cache + offset, value_cache + offset)
    tl.store(destination + 2 * pairs, even, mask=pair_ok)
    tl.store(destination + 2 * pairs + 1, odd, mask=pair_ok)
    tl.store(destination + 2 * ROT_HALF + rest, tail, mask=rest_ok)


def rotary_kv_write(qkv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, position_scale: float,
                    slot_mapping: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    heads: int) -> torch.Tensor:
    """Rotated query [N, heads, D] of the packed QKV rows [N, (heads + 2 * groups) * D];
    the rotated keys and the values land in key_cache/value_cache [slots, groups, D]
    at `slot_mapping`. `inv_freq` [rotary_dim // 2] float32 holds the rotary frequencies."""
    tokens = qkv.shape[0]
    groups, head_dim = key_cache.shape[1], key_cache.shape[2]
    query = torch.empty(tokens, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    rot_half = inv_freq.shape[0]
    # The kernel indexes positions and slots densely; a strided view (a column of
    # a graph's static input block) is copied first (inside the graph when captured).
    _rotary_kv_kernel[(tokens, heads + 2 * groups)](
        qkv.contiguous(), positions.contiguous(), inv_freq.contiguous(), slot_mapping.contiguous(), query, key_cache,
        value_cache, position_scale, HEADS=heads, GROUPS=groups, HEAD_DIM=head_dim, ROT_HALF=rot_half,
        BLOCK_R=triton.next_power_of_2(rot_half), BLOCK_P=max(1, triton.next_power_of_2(head_dim - 2 * rot_half)),
        **dependent_launch(_rotary_kv_kernel, qkv.device))
    return query
