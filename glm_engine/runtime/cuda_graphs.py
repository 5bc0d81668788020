"""CUDA graphs of the decode step: the whole step (embedding, every layer with
the paged decode-attention kernel, final norm, output layer and greedy argmax)
captured once per batch-size bucket at session start, then replayed with new
inputs copied into its static tensors. Needs the attention plugin, whose
kernels take fixed shapes (block tables, context lengths) instead of the
reference attention's per-step shapes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from glm_engine.runtime.kv_cache import AttentionBatch

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

    def __init__(self, session: Session, size: int, padding_row: list[int], pool) -> None:
        device, build = session.device, session.build_config
        # Columns: token, position, slot, context length, then the block table: one
        # host-to-device copy per step fills it, padding rows included. The kernels
        # get dense copies of the columns, made inside the graph.
        self.inputs = torch.tensor([padding_row] * size, dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.slots = torch.zeros(size, dtype=torch.int64, device=device)
        self.context_lengths = torch.zeros(size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(size, session.blocks_per_sequence, dtype=torch.int32, device=device)
        batch = AttentionBatch(
            positions=self.positions, slot_mapping=self.slots, query_index=None, output_rows=None, key_slots=None,
            attention_bias=None, last_token_index=None, block_tables=self.block_tables,
            context_lengths=self.context_lengths, max_context=build.max_sequence_len)
        model, cache = session.model, session.kv_cache

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            for column, target in enumerate((self.input_ids, self.positions, self.slots, self.context_lengths)):
                target.copy_(self.inputs[:, column])
            self.block_tables.copy_(self.inputs[:, 4:])
            logits = model.logits(model(self.input_ids, batch, cache))
            return logits, logits.argmax(dim=-1)

        self.step = step
        if device.type != "cuda":  # no graphs off the GPU: replay runs the same step eagerly
            self.graph = None
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compiles the kernels, settles cuBLAS workspaces
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits, self.greedy = step()

    def replay(self) -> None:
        if self.graph is None:
            self.logits, self.greedy = self.step()
        else:
            self.graph.replay()


class DecodeGraphs:
    """The decode-step graphs of a session, one per batch-size bucket. Off the GPU
    the same static-input step runs eagerly, so its plumbing is testable on the CPU."""

    def __init__(self, session: Session) -> None:
        # No reference back to the session: a cycle would keep the weights alive after it is dropped.
        self.blocks_per_sequence = session.blocks_per_sequence
        self.block_size = session.kv_cache.block_size
        self.scratch = scratch = session.scratch_block
        # A padding row: token 0 at position 0 of the scratch block.
        self.padding_row = [0, 0, scratch * self.block_size, 1] + [scratch] * self.blocks_per_sequence
        self.graphs: dict[int, _Graph] = {}
        pool = None
        for size in sorted(batch_buckets(session.build_config.max_batch_size), reverse=True):
            self.graphs[size] = _Graph(session, size, self.padding_row, pool)
            pool = self.graphs[size].graph.pool() if self.graphs[size].graph is not None else None

    def run(self, block_tables: list[list[int]], cached: list[int],
            tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits [n, vocab] and greedy tokens [n] for one new token per sequence
        (`cached` tokens already in its blocks `block_tables`)."""
        count = len(block_tables)
        graph = self.graphs[min(size for size in self.graphs if size >= count)]
        block_size, width = self.block_size, self.blocks_per_sequence
        inputs = []
        for table, position, token in zip(block_tables, cached, tokens):
            slot = table[position // block_size] * block_size + position % block_size
            inputs.append([token, position, slot, position + 1] + table + [self.scratch] * (width - len(table)))
        inputs += [self.padding_row] * (len(graph.inputs) - count)
        graph.inputs.copy_(torch.tensor(inputs), non_blocking=True)
        graph.replay()
        return graph.logits[:count], graph.greedy[:count]
