"""The KV cache: one pool of fixed-size blocks per layer, addressed through
per-sequence block tables. A contiguous cache is the case of one block per
sequence, which is what the session uses until paged KV cache lands."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    """K and V of every layer: [num_layers, num_blocks * block_size, groups, head_dim] each,
    so that a token's cache slot is `block * block_size + offset`."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, groups: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_layers, num_blocks * block_size, groups, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def write(self, layer: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Stores key/value [N, groups, head_dim] of N new tokens at their slots."""
        self.keys[layer].index_copy_(0, slot_mapping, key)
        self.values[layer].index_copy_(0, slot_mapping, value)


@dataclass
class AttentionBatch:
    """Where the N packed new tokens of B sequences sit, in the stream and in the cache."""

    positions: torch.Tensor  # [N] absolute position of each new token
    slot_mapping: torch.Tensor  # [N] cache slot each new token's K/V is written to
    query_index: torch.Tensor  # [B, T] packed index of each sequence's new tokens (padded)
    query_positions: torch.Tensor  # [B, T] their positions, -1 for padding
    key_slots: torch.Tensor  # [B, L] cache slot of every key position (padded)
    context_lengths: torch.Tensor  # [B] keys per sequence once the new tokens are in
    last_token_index: torch.Tensor  # [B] packed index of each sequence's last new token


def make_attention_batch(block_tables: list[list[int]], cached_lengths: list[int],
                         new_token_counts: list[int], block_size: int,
                         device: torch.device) -> AttentionBatch:
    """Addresses for one forward step: sequence i has `cached_lengths[i]` tokens in
    the cache already and `new_token_counts[i]` new tokens packed after those of
    sequence i-1."""
    positions, slots, query_index, query_positions, key_slots, last = [], [], [], [], [], []
    max_new = max(new_token_counts)
    max_keys = max(c + n for c, n in zip(cached_lengths, new_token_counts))
    start = 0
    for table, cached, new in zip(block_tables, cached_lengths, new_token_counts):
        seq_slots = [table[p // block_size] * block_size + p % block_size for p in range(cached + new)]
        positions += range(cached, cached + new)
        slots += seq_slots[cached:]
        query_index.append([start + min(t, new - 1) for t in range(max_new)])
        query_positions.append([cached + t if t < new else -1 for t in range(max_new)])
        key_slots.append(seq_slots + [seq_slots[-1]] * (max_keys - len(seq_slots)))
        start += new
        last.append(start - 1)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return AttentionBatch(
        positions=as_tensor(positions), slot_mapping=as_tensor(slots),
        query_index=as_tensor(query_index), query_positions=as_tensor(query_positions),
        key_slots=as_tensor(key_slots),
        context_lengths=as_tensor([c + n for c, n in zip(cached_lengths, new_token_counts)]),
        last_token_index=as_tensor(last))
