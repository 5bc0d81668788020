"""Paged decode attention ("gpt attention plugin", generation phase) in Triton.

One new query token per sequence attends to its cached keys, read through the
sequence's block table. Each program takes one sequence, one K/V group and one
split of the context: the group's query heads (16 for ChatGLM2-6B) share every
K/V tile it loads, so each K/V head is read once for all of them. Splitting the
context across programs (flash-decoding) keeps the GPU busy at small batch; a
second kernel merges the splits' partial softmax results.

Reference: `reference.paged_attention` with one new token per sequence."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm_engine.kernels.cache_format import from_cache
from glm_engine.kernels.launch import dependent_launch, wait_for_previous_kernel

TOKENS_PER_TILE = 64  # keys per loop step; a tile may span several cache blocks


@triton.jit
def _split_kernel(query, key_cache, value_cache, block_tables, context_lengths, partial_out, partial_max,
                  partial_sum, scale, stride_table, tokens_per_split, key_scales, value_scales,
                  GROUPS: tl.constexpr, HEADS_PER_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr, CACHE_INT8: tl.constexpr,
                  PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    sequence, group, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads = group * HEADS_PER_GROUP + tl.arange(0, BLOCK_H)
    head_ok = tl.arange(0, BLOCK_H) < HEADS_PER_GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    num_heads = GROUPS * HEADS_PER_GROUP
    q = tl.load(query + (sequence * num_heads + heads)[:, None] * HEAD_DIM + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)
    context = tl.load(context_lengths + sequence)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, context)
    running_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for tile in range(start, end, BLOCK_N):
        positions = tile + tl.arange(0, BLOCK_N)
        token_ok = positions < end
        blocks = tl.load(block_tables + sequence * stride_table + positions // BLOCK_SIZE, mask=token_ok, other=0)
        slots = blocks.to(tl.int64) * BLOCK_SIZE + positions % BLOCK_SIZE
        offsets = (slots * GROUPS + group)[:, None] * HEAD_DIM + dims[None, :]
        k = from_cache(tl.load(key_cache + offsets, mask=token_ok[:, None] & dim_ok[None, :], other=0.0), key_scales,
                       group, q.dtype, CACHE_INT8)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        scores = tl.where(token_ok[None, :], scores, float("-inf"))
        tile_max = tl.maximum(running_max, tl.max(scores, axis=1))
        probs = tl.exp(scores - tile_max[:, None])
        correction = tl.exp(running_max - tile_max)
        running_sum = running_sum * correction + tl.sum(probs, axis=1)
        v = from_cache(tl.load(value_cache + offsets, mask=token_ok[:, None] & dim_ok[None, :], other=0.0),
                       value_scales, group, q.dtype, CACHE_INT8)
        acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        running_max = tile_max
    out_rows = (sequence * num_heads + heads) * NUM_SPLITS + split
    tl.store(partial_out + out_rows[:, None] * HEAD_DIM + dims[None, :], acc,
             mask=head_ok[:, None] & dim_ok[None, :])
    tl.store(partial_max + out_rows, running_max, mask=head_ok)
    tl.store(partial_sum + out_rows, running_sum, mask=head_ok)


@triton.jit
def _merge_kernel(partial_out, partial_max, partial_sum, out, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0)  # sequence * heads + head
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < NUM_SPLITS
    maxima = tl.load(partial_max + row * NUM_SPLITS + splits, mask=split_ok, other=float("-inf"))
    sums = tl.load(partial_sum + row * NUM_SPLITS + splits, mask=split_ok, other=0.0)
    overall = tl.max(maxima, axis=0)
    # Splits past the context hold max -inf and sum 0: weight 0.
    weights = tl.where(sums > 0, tl.exp(maxima - overall), 0.0)
    dims = tl.arange(0, BLOCK_D)
    partial = tl.load(partial_out + (row * NUM_SPLITS + splits)[:, None] * HEAD_DIM + dims[None, :],
                      mask=split_ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    result = tl.sum(partial * weights[:, None], axis=0) / tl.sum(sums * weights, axis=0)
    tl.store(out + row * HEAD_DIM + dims, result.to(out.dtype.element_ty), mask=dims < HEAD_DIM)


def choose_num_splits(batch: int, groups: int, max_context: int, block_n: int = TOKENS_PER_TILE) -> int:
    """Enough programs to fill the GPU (about 2 per SM of an H100), no split under one tile."""
    wanted = triton.cdiv(264, batch * groups)
    return max(1, min(wanted, triton.cdiv(max_context, block_n)))


def decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lengths: torch.Tensor, block_size: int,
                     scale: float, max_context: int, num_splits: int | None = None,
                     out: torch.Tensor | None = None, key_scales: torch.Tensor | None = None,
                     value_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over its paged cache.

    query: [B, heads, D]; key_cache/value_cache: [num_blocks * block_size, groups, D];
    block_tables: [B, max_blocks] int32/int64; context_lengths: [B] (keys per sequence,
    the new token's included; at most `max_context`). Returns [B, heads, D].
    Shapes depend only on B and `max_context`, so a CUDA graph can capture the call. An
    FP8 cache is read as the query's dtype, an INT8 one times `key_scales`/`value_scales`
    [groups].
    `out`, when given, receives the result."""
    batch, heads, head_dim = query.shape
    groups = key_cache.shape[1]
    heads_per_group = heads // groups
    splits = num_splits or choose_num_splits(batch, groups, max_context, TOKENS_PER_TILE)
    tokens_per_split = triton.cdiv(triton.cdiv(max_context, splits), TOKENS_PER_TILE) * TOKENS_PER_TILE
    partial_out = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=query.device)
    partial_max = torch.empty(batch, heads, splits, dtype=torch.float32, device=query.device)
    partial_sum = torch.empty_like(partial_max)
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    # The kernel indexes its inputs densely; strided views are copied first.
    block_tables, context_lengths = block_tables.contiguous(), context_lengths.contiguous()
    _split_kernel[(batch, groups, splits)](
        query.contiguous(), key_cache, value_cache, block_tables, context_lengths, partial_out, partial_max,
        partial_sum, scale, block_tables.stride(0), tokens_per_split, key_scales, value_scales,
        GROUPS=groups, HEADS_PER_GROUP=heads_per_group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_H=max(16, triton.next_power_of_2(heads_per_group)), BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=TOKENS_PER_TILE, NUM_SPLITS=splits, PRECISION=precision, CACHE_INT8=key_cache.dtype == torch.int8,
        **dependent_launch(_split_kernel, query.device))
    out = torch.empty_like(query) if out is None else out
    _merge_kernel[(batch * heads,)](partial_out, partial_max, partial_sum, out, HEAD_DIM=head_dim,
                                    BLOCK_D=triton.next_power_of_2(head_dim), NUM_SPLITS=splits,
                                    BLOCK_S=triton.next_power_of_2(splits),
                                    **dependent_launch(_merge_kernel, query.device))
    return out
