"""The KV cache: one pool of fixed-size blocks for all layers, addressed through
per-sequence block tables (runtime/block_manager.py hands the blocks out), and
the addresses of one forward step's packed tokens in it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    """K and V of every layer: [num_layers, num_blocks * block_size, groups, head_dim] each,
    so that a token's cache slot is `block * block_size + offset`."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, groups: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.block_size = block_size
        shape = (num_layers, num_blocks * block_size, groups, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def write(self, layer: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Stores key/value [N, groups, head_dim] of N new tokens at their slots."""
        self.keys[layer].index_copy_(0, slot_mapping, key)
        self.values[layer].index_copy_(0, slot_mapping, value)


@dataclass
class AttentionBatch:
    """Where the N packed new tokens of B sequences sit, in the stream and in the cache.
    The reference attention reads query_index .. attention_bias; the plugin's kernels
    read block_tables, context_lengths and new_token_counts, so steps that only run
    those (a captured decode graph, context FMHA) leave the reference fields None."""

    positions: torch.Tensor  # [N] absolute position of each new token
    slot_mapping: torch.Tensor  # [N] cache slot each new token's K/V is written to
    query_index: torch.Tensor | None  # [B, T] packed index of each sequence's new tokens (padded)
    output_rows: torch.Tensor | None  # [N] row of each packed token in the flattened [B * T] grid
    key_slots: torch.Tensor | None  # [B, L] cache slot of every key position (padded)
    attention_bias: torch.Tensor | None  # [B, T, L] model dtype: 0 where attending is allowed, -inf elsewhere
    last_token_index: torch.Tensor | None  # [B] packed index of each sequence's last new token
    block_tables: torch.Tensor  # [B, max_blocks] int32, for the paged kernels
    context_lengths: torch.Tensor  # [B] int32, keys per sequence once the new tokens are in
    max_context: int  # bound on context_lengths, which sizes the decode kernel's splits
    new_token_counts: torch.Tensor | None = None  # [B] int32, for context FMHA
    max_new_tokens: int = 1  # the largest of new_token_counts

    @property
    def decode(self) -> bool:
        """One new token per sequence."""
        return self.max_new_tokens == 1


def make_attention_batch(block_tables: list[list[int]], cached_lengths: list[int],
                         new_token_counts: list[int], block_size: int, device: torch.device,
                         dtype: torch.dtype = torch.float32, max_context: int | None = None,
                         reference_fields: bool = True) -> AttentionBatch:
    """Addresses for one forward step: sequence i has `cached_lengths[i]` tokens in
    the cache already and `new_token_counts[i]` new tokens packed after those of
    sequence i-1. Built on the CPU, then moved to `device`; the attention bias is
    in `dtype`, the model's, so that scores plus bias stay in that dtype.
    `max_context` (default: the longest context of this step) bounds every context.
    Without `reference_fields` the reference attention's inputs (key slots, bias:
    the large ones in prefill) are not built."""
    cached = torch.tensor(cached_lengths)
    new = torch.tensor(new_token_counts)
    total = cached + new
    max_new, max_keys = int(new.max()), int(total.max())
    widest = max(map(len, block_tables))
    tables = torch.tensor([table + [table[-1]] * (widest - len(table)) for table in block_tables])
    starts = torch.cumsum(new, 0) - new

    # Key positions past a sequence's end repeat its last position.
    key_positions = torch.minimum(torch.arange(max_keys)[None, :], total[:, None] - 1)
    key_slots = tables.gather(1, key_positions // block_size) * block_size + key_positions % block_size
    steps = torch.arange(max_new)[None, :]
    valid = steps < new[:, None]
    query_positions = cached[:, None] + torch.minimum(steps, new[:, None] - 1)
    query_index = starts[:, None] + torch.minimum(steps, new[:, None] - 1)
    to_device = lambda tensor: tensor.to(device, non_blocking=True)  # noqa: E731
    return AttentionBatch(
        positions=to_device(query_positions[valid]),
        slot_mapping=to_device(key_slots.gather(1, query_positions)[valid]),
        query_index=to_device(query_index) if reference_fields else None,
        output_rows=to_device(torch.arange(len(new) * max_new).view(len(new), max_new)[valid])
        if reference_fields else None,
        key_slots=to_device(key_slots) if reference_fields else None,
        attention_bias=causal_bias(to_device(query_positions), to_device(valid), max_keys, dtype)
        if reference_fields else None,
        last_token_index=to_device(starts + new - 1),
        block_tables=to_device(tables.to(torch.int32)),
        context_lengths=to_device(total.to(torch.int32)),
        max_context=max_context or max_keys,
        new_token_counts=to_device(new.to(torch.int32)),
        max_new_tokens=max_new)


def causal_bias(query_positions: torch.Tensor, valid: torch.Tensor, max_keys: int,
                dtype: torch.dtype) -> torch.Tensor:
    """[B, T, L] bias in `dtype`, built on the queries' device (it is large in prefill):
    0 where key l <= the query's position, -inf elsewhere; padding rows see key 0 only,
    so that their softmax stays finite."""
    key_range = torch.arange(max_keys, device=query_positions.device)
    allowed = (key_range <= query_positions[:, :, None]) & valid[:, :, None]
    allowed[:, :, 0] |= ~valid
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
