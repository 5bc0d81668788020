"""Causal flash attention for the context phase ("context FMHA") in Triton:
the packed new tokens of each sequence attend to the keys before them, the
sequence's cached ones included, read through its block table. Softmax runs
online in float32; the P.V accumulator is float32, or float16 as in
TensorRT-LLM's --enable_context_fmha (its fp32-acc variant keeps float32).

Reference: `reference.paged_attention`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm_engine.kernels.cache_format import from_cache

LOG2_E = 1.4426950408889634  # the kernel's exponentials are base 2


@triton.jit
def _attend_key_tile(q, acc, running_max, running_sum, key_start, last_key, positions, key_cache, value_cache,
                     key_scales, value_scales, table_row, group, dims, dim_ok, qk_scale, GROUPS: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL_MASK: tl.constexpr, FP16_ACC: tl.constexpr, PRECISION: tl.constexpr,
                     CACHE_INT8: tl.constexpr):
    """One online-softmax step over keys key_start .. key_start + BLOCK_N (base-2 exponentials;
    qk_scale includes log2(e)). Only tiles that reach the diagonal apply the causal mask."""
    keys = key_start + tl.arange(0, BLOCK_N)
    key_ok = keys < last_key
    blocks = tl.load(table_row + keys // BLOCK_SIZE, mask=key_ok, other=0)
    slots = blocks.to(tl.int64) * BLOCK_SIZE + keys % BLOCK_SIZE
    offsets = (slots * GROUPS + group)[:, None] * HEAD_DIM + dims[None, :]
    k = from_cache(tl.load(key_cache + offsets, mask=key_ok[:, None] & dim_ok[None, :], other=0.0), key_scales, group,
                   q.dtype, CACHE_INT8)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if CAUSAL_MASK:
        allowed = (keys[None, :] <= positions[:, None]) & key_ok[None, :]
        scores = tl.where(allowed, scores, float("-inf"))
    tile_max = tl.maximum(running_max, tl.max(scores, axis=1))
    tile_max = tl.where(tile_max == float("-inf"), 0.0, tile_max)  # rows with no key yet
    probs = tl.exp2(scores - tile_max[:, None])
    correction = tl.exp2(running_max - tile_max)
    running_sum = running_sum * correction + tl.sum(probs, axis=1)
    v = from_cache(tl.load(value_cache + offsets, mask=key_ok[:, None] & dim_ok[None, :], other=0.0), value_scales,
                   group, q.dtype, CACHE_INT8)
    if FP16_ACC:
        acc = acc * correction[:, None].to(tl.float16) + tl.dot(probs.to(v.dtype), v, out_dtype=tl.float16)
    else:
        acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
    return acc, tile_max, running_sum


@triton.jit
def _context_attention_kernel(query, key_cache, value_cache, block_tables, last_token_index, new_counts,
                              context_lengths, out, qk_scale, stride_table, key_scales, value_scales,
                              HEADS: tl.constexpr, GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, FP16_ACC: tl.constexpr, PRECISION: tl.constexpr,
                              CACHE_INT8: tl.constexpr):
    tile, sequence, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    new = tl.load(new_counts + sequence)
    if tile * BLOCK_M < new:
        cached = tl.load(context_lengths + sequence) - new
        start = tl.load(last_token_index + sequence) - new + 1
        group = head // (HEADS // GROUPS)
        steps = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        step_ok = steps < new
        positions = cached + steps
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        rows = (start + steps).to(tl.int64)
        q = tl.load(query + (rows * HEADS + head)[:, None] * HEAD_DIM + dims[None, :],
                    mask=step_ok[:, None] & dim_ok[None, :], other=0.0)
        running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float16 if FP16_ACC else tl.float32)
        table_row = block_tables + sequence * stride_table
        # Keys before the tile's first query are visible to all its rows: no mask there.
        unmasked_end = (cached + tile * BLOCK_M) // BLOCK_N * BLOCK_N
        last_key = cached + tl.minimum((tile + 1) * BLOCK_M, new)  # keys this tile may see
        for key_start in range(0, unmasked_end, BLOCK_N):
            acc, running_max, running_sum = _attend_key_tile(
                q, acc, running_max, running_sum, key_start, last_key, positions, key_cache, value_cache, key_scales,
                value_scales, table_row, group, dims, dim_ok, qk_scale, GROUPS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, False,
                FP16_ACC, PRECISION, CACHE_INT8)
        for key_start in range(unmasked_end, last_key, BLOCK_N):
            acc, running_max, running_sum = _attend_key_tile(
                q, acc, running_max, running_sum, key_start, last_key, positions, key_cache, value_cache, key_scales,
                value_scales, table_row, group, dims, dim_ok, qk_scale, GROUPS, HEAD_DIM, BLOCK_SIZE, BLOCK_N, True,
                FP16_ACC, PRECISION, CACHE_INT8)
        result = acc.to(tl.float32) / running_sum[:, None]
        tl.store(out + (rows * HEADS + head)[:, None] * HEAD_DIM + dims[None, :], result.to(out.dtype.element_ty),
                 mask=step_ok[:, None] & dim_ok[None, :])


def context_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_tables: torch.Tensor, context_lengths: torch.Tensor, new_counts: torch.Tensor,
                      last_token_index: torch.Tensor, max_new: int, block_size: int, scale: float,
                      fp16_accumulation: bool, block_m: int | None = None, block_n: int = 64,
                      num_warps: int = 4, num_stages: int = 2, key_scales: torch.Tensor | None = None,
                      value_scales: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of the packed new tokens [N, heads, D] of B sequences:
    sequence i has `new_counts[i]` new tokens ending at packed index
    `last_token_index[i]`, after `context_lengths[i] - new_counts[i]` cached ones; its
    K/V (new tokens included) are already in the cache. `max_new` bounds new_counts.
    Returns [N, heads, D]. Block sizes default to the tuned ones (docs/PERFORMANCE.md). An FP8
    cache is read as the query's dtype, an INT8 one times `key_scales`/`value_scales` [groups]."""
    tokens, heads, head_dim = query.shape
    groups = key_cache.shape[1]
    batch = new_counts.shape[0]
    out = torch.empty_like(query)
    if block_m is None:
        block_m = 16 if max_new <= 16 else 64
    grid = (triton.cdiv(max_new, block_m), batch, heads)
    block_tables, context_lengths = block_tables.contiguous(), context_lengths.contiguous()
    _context_attention_kernel[grid](
        query.contiguous(), key_cache, value_cache, block_tables, last_token_index.contiguous(),
        new_counts.contiguous(), context_lengths, out, scale * LOG2_E, block_tables.stride(0), key_scales, value_scales,
        HEADS=heads, GROUPS=groups,
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        FP16_ACC=fp16_accumulation and query.dtype == torch.float16,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32", CACHE_INT8=key_cache.dtype == torch.int8,
        num_warps=num_warps, num_stages=num_stages)
    return out
