"""CUDA graphs of the decode step: the whole step (embedding, every layer with
the paged decode-attention kernel, final norm, output layer and greedy argmax)
captured once per batch-size bucket at session start, then replayed with new
inputs copied into its static tensors. Needs the attention plugin, whose
kernels take fixed shapes (block tables, context lengths) instead of the
reference attention's per-step shapes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from glm_engine.runtime.kv_cache import AttentionBatch, row_block_table

if TYPE_CHECKING:
    from glm_engine.runtime.session import Session


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to max_batch_size, which is always a bucket."""
    buckets = [1]
    while buckets[-1] * 2 < max_batch_size:
        buckets.append(buckets[-1] * 2)
    return sorted(set(buckets + [max_batch_size]))


class _Graph:
    """One captured decode step for `size` rows and its static tensors."""

    def __init__(self, session: Session, size: int, pool) -> None:
        device, build = session.device, session.build_config
        self.size = size
        self.input_ids = torch.zeros(size, dtype=torch.long, device=device)
        # Columns: position, slot, context length; then the block table. One host-to-device
        # copy per step fills it; the kernels get contiguous copies made inside the graph.
        self.addresses = torch.zeros(size, 3 + session.blocks_per_row, dtype=torch.int64, device=device)
        positions, slots, contexts = self.addresses[:, 0], self.addresses[:, 1], self.addresses[:, 2]
        self.block_tables = torch.zeros(size, session.blocks_per_row, dtype=torch.int32, device=device)
        self.context_lengths = torch.zeros(size, dtype=torch.int32, device=device)
        batch = AttentionBatch(
            positions=positions, slot_mapping=slots, query_index=None, output_rows=None, key_slots=None,
            attention_bias=None, last_token_index=None, block_tables=self.block_tables,
            context_lengths=self.context_lengths, max_context=build.max_sequence_len, decode=True)
        self.contexts = contexts
        session_model, cache = session.model, session.kv_cache

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            self.block_tables.copy_(self.addresses[:, 3:])
            self.context_lengths.copy_(self.contexts)
            logits = session_model.logits(session_model(self.input_ids, batch, cache))
            return logits, logits.argmax(dim=-1)

        self.fill_padding(0, session.scratch_block, cache.block_size)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compiles the kernels, settles cuBLAS workspaces
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits, self.greedy = step()

    def fill_padding(self, first: int, scratch: int, block_size: int) -> None:
        """Rows from `first` on: one token at position 0 of the scratch block."""
        self.input_ids[first:] = 0
        self.addresses[first:, 0] = 0
        self.addresses[first:, 1] = scratch * block_size
        self.addresses[first:, 2] = 1
        self.addresses[first:, 3:] = scratch


class DecodeGraphs:
    """The decode-step graphs of a session, one per batch-size bucket."""

    def __init__(self, session: Session) -> None:
        # No reference back to the session: a cycle would keep the weights alive after it is dropped.
        self.blocks_per_row = session.blocks_per_row
        self.block_size = session.kv_cache.block_size
        self.scratch_block = session.scratch_block
        self.graphs: dict[int, _Graph] = {}
        pool = None
        for size in sorted(batch_buckets(session.build_config.max_batch_size), reverse=True):
            self.graphs[size] = _Graph(session, size, pool)
            pool = self.graphs[size].graph.pool()

    def run(self, rows: list[int], cached: list[int], tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits [n, vocab] and greedy tokens [n] for one new token per row."""
        count = len(rows)
        graph = self.graphs[min(size for size in self.graphs if size >= count)]
        block_size = self.block_size
        addresses = []
        for row, position in zip(rows, cached):
            table = row_block_table(row, self.blocks_per_row)
            slot = table[position // block_size] * block_size + position % block_size
            addresses.append([position, slot, position + 1] + table)
        graph.input_ids[:count].copy_(torch.tensor(tokens), non_blocking=True)
        graph.addresses[:count].copy_(torch.tensor(addresses), non_blocking=True)
        graph.fill_padding(count, self.scratch_block, block_size)
        graph.graph.replay()
        return graph.logits[:count], graph.greedy[:count]
