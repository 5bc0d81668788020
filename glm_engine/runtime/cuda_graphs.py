"""CUDA graphs of the decode step: the whole step (embedding, every layer with
the paged decode-attention kernel, final norm, output layer and greedy argmax)
captured once per batch-size bucket at start-up, then replayed with new inputs
copied into its static tensors. Needs the attention plugin (PagedAttention),
whose kernels take fixed shapes (block tables, context lengths) instead of the
reference attention's per-step shapes."""

from __future__ import annotations

import torch
from torch import nn

from glm_engine.attention import PagedMetadata
from glm_engine.runtime.kv_cache import KVCache


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to max_batch_size, which is always a bucket."""
    buckets = [1]
    while buckets[-1] * 2 < max_batch_size:
        buckets.append(buckets[-1] * 2)
    return sorted(set(buckets + [max_batch_size]))


class _Graph:
    """One captured decode step for `size` rows and its static tensors."""

    def __init__(self, network: nn.Module, kv_cache: KVCache, size: int, padding_row: list[int], max_context: int,
                 device: torch.device, pool) -> None:
        # Columns: token, position, slot, context length, then the block table: one
        # host-to-device copy per step fills it, padding rows included. The kernels
        # get dense copies of the columns, made inside the graph.
        self.inputs = torch.tensor([padding_row] * size, dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        positions = torch.zeros(size, dtype=torch.int64, device=device)
        slots = torch.zeros(size, dtype=torch.int64, device=device)
        context_lengths = torch.zeros(size, dtype=torch.int32, device=device)
        block_tables = torch.zeros(size, len(padding_row) - 4, dtype=torch.int32, device=device)
        metadata = PagedMetadata(positions=positions, slot_mapping=slots, block_tables=block_tables,
                                 context_lengths=context_lengths, max_context=max_context)

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            for column, target in enumerate((self.input_ids, positions, slots, context_lengths)):
                target.copy_(self.inputs[:, column])
            block_tables.copy_(self.inputs[:, 4:])
            logits = network.logits(network(self.input_ids, metadata, kv_cache))
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
    """The decode-step graphs of a network over one KV cache, one per batch-size bucket.
    Off the GPU the same static-input step runs eagerly, so its plumbing is testable on
    the CPU. Padding rows write their K/V to `scratch_block`."""

    def __init__(self, network: nn.Module, kv_cache: KVCache, max_batch_size: int, blocks_per_sequence: int,
                 scratch_block: int, max_context: int, device: torch.device) -> None:
        self.blocks_per_sequence = blocks_per_sequence
        self.block_size = kv_cache.block_size
        self.scratch = scratch_block
        # A padding row: token 0 at position 0 of the scratch block.
        self.padding_row = [0, 0, scratch_block * self.block_size, 1] + [scratch_block] * blocks_per_sequence
        self.graphs: dict[int, _Graph] = {}
        pool = None
        for size in sorted(batch_buckets(max_batch_size), reverse=True):
            self.graphs[size] = _Graph(network, kv_cache, size, self.padding_row, max_context, device, pool)
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
