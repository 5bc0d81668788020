"""CUDA graphs of forward steps, captured at start-up and replayed with new inputs
copied into their static tensors; each runs the whole step (embedding, every
layer, final norm, output layer and greedy argmax):
- the decode step (one new token a sequence, the paged decode-attention kernel),
  one graph per batch-size bucket;
- on engines with context FMHA, the step of one sequence's prompt or prompt chunk
  of up to MAX_PROMPT_TOKENS tokens, one graph per token-count bucket. Run eagerly,
  such a step is bound by the host's kernel launches (~0.7 ms a layer on the H100
  host, docs/PERFORMANCE.md), not by the GPU.
Needs the attention plugin (PagedAttention), whose kernels take fixed shapes (block
tables, context lengths, token counts on the device) instead of the reference
attention's per-step shapes. Padding tokens and padding rows write their K/V to a
scratch block."""

from __future__ import annotations

import torch
from torch import nn

from glm_engine.attention import PagedMetadata
from glm_engine.runtime.kv_cache import KVCache

# Longer prompts keep the GPU busier than the host (and from 1024 tokens take SDPA, eagerly).
MAX_PROMPT_TOKENS = 512
SEQUENCE_COLUMNS = 3  # a sequence's row of the static inputs: context length, new tokens, last token's index


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to max_batch_size, which is always a bucket."""
    buckets = [1]
    while buckets[-1] * 2 < max_batch_size:
        buckets.append(buckets[-1] * 2)
    return sorted(set(buckets + [max_batch_size]))


def token_buckets(max_tokens: int) -> list[int]:
    """16, 32, 64, ... : powers of two from 16 up to the first that holds
    min(max_tokens, MAX_PROMPT_TOKENS)."""
    buckets = [16]
    while buckets[-1] < min(max_tokens, MAX_PROMPT_TOKENS):
        buckets.append(buckets[-1] * 2)
    return buckets


class _Graph:
    """One captured step of `tokens` packed new tokens of `sequences` sequences (decode:
    one token each) and its static inputs, one int64 tensor that one host-to-device copy
    fills: the tokens' ids, positions and cache slots, then a row per sequence (context
    length, new tokens, packed index of its last new token, block table)."""

    def __init__(self, network: nn.Module, kv_cache: KVCache, sequences: int, tokens: int, padding: torch.Tensor,
                 max_context: int, device: torch.device, pool) -> None:
        self.sequences, self.tokens = sequences, tokens
        self.decode = sequences == tokens  # one new token a sequence: the decode-attention kernel
        self.inputs = padding.to(device)
        input_ids, positions, slots = self.inputs[:3 * tokens].view(3, tokens)
        rows = self.inputs[3 * tokens:].view(sequences, -1)
        context_lengths = torch.zeros(sequences, dtype=torch.int32, device=device)
        new_token_counts = torch.zeros_like(context_lengths)
        last_token_index = torch.zeros(sequences, dtype=torch.int64, device=device)
        block_tables = torch.zeros(sequences, rows.shape[1] - SEQUENCE_COLUMNS, dtype=torch.int32, device=device)
        metadata = PagedMetadata(positions=positions, slot_mapping=slots, block_tables=block_tables,
                                 context_lengths=context_lengths, max_context=max_context,
                                 new_token_counts=None if self.decode else new_token_counts,
                                 last_token_index=None if self.decode else last_token_index,
                                 max_new_tokens=1 if self.decode else tokens)

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            # The kernels take dense int32 copies of the columns, made inside the graph.
            context_lengths.copy_(rows[:, 0])
            block_tables.copy_(rows[:, SEQUENCE_COLUMNS:])
            if not self.decode:
                new_token_counts.copy_(rows[:, 1])
                last_token_index.copy_(rows[:, 2])
            hidden = network(input_ids, metadata, kv_cache)
            logits = network.logits(hidden if self.decode else hidden[last_token_index])
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


class _GraphSet:
    """Graphs of one kind keyed by their bucket, over one KV cache, all in one memory pool."""

    def __init__(self, kv_cache: KVCache, blocks_per_sequence: int, scratch_block: int) -> None:
        self.width, self.block_size, self.scratch = blocks_per_sequence, kv_cache.block_size, scratch_block
        self.graphs: dict[int, _Graph] = {}

    def static_inputs(self, block_tables: list[list[int]], cached: list[int], new_tokens: list[list[int]],
                      sequences: int, tokens: int) -> list[int]:
        """A step's values for the static inputs of a graph of `sequences` rows and `tokens`
        tokens, padded: padding tokens are token 0 at position 0 of the scratch block,
        padding rows one token long over that block."""
        block_size, width = self.block_size, self.width
        ids, positions, slots, rows = [], [], [], []
        for table, done, step_tokens in zip(block_tables, cached, new_tokens):
            for position in range(done, done + len(step_tokens)):
                positions.append(position)
                slots.append(table[position // block_size] * block_size + position % block_size)
            ids += step_tokens
            rows += [done + len(step_tokens), len(step_tokens), len(ids) - 1] + table
            rows += [self.scratch] * (width - len(table))
        spare_tokens, spare_rows = tokens - len(ids), sequences - len(block_tables)
        padding_row = [1, 1, 0] + [self.scratch] * width
        return (ids + [0] * spare_tokens + positions + [0] * spare_tokens + slots
                + [self.scratch * block_size] * spare_tokens + rows + padding_row * spare_rows)

    def capture(self, network: nn.Module, kv_cache: KVCache, shapes: list[tuple[int, int]], max_context: int,
                device: torch.device, pool=None):
        """Captures a graph for each (sequences, tokens), largest first, sharing `pool`
        (a new one when None); returns the pool."""
        for sequences, tokens in sorted(shapes, reverse=True):
            padding = torch.tensor(self.static_inputs([], [], [], sequences, tokens), dtype=torch.int64)
            graph = _Graph(network, kv_cache, sequences, tokens, padding, max_context, device, pool)
            self.graphs[tokens] = graph
            pool = graph.graph.pool() if graph.graph is not None else None
        return pool

    def run_in(self, graph: _Graph, block_tables: list[list[int]], cached: list[int],
               new_tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fills `graph`'s static inputs with the step and replays it: float32 logits
        [n, vocab] of each sequence's last new token and their argmax."""
        inputs = self.static_inputs(block_tables, cached, new_tokens, graph.sequences, graph.tokens)
        graph.inputs.copy_(torch.tensor(inputs, dtype=torch.int64), non_blocking=True)
        graph.replay()
        count = len(block_tables)
        return graph.logits[:count], graph.greedy[:count]


class DecodeGraphs(_GraphSet):
    """The decode-step graphs of a network over one KV cache, one per batch-size bucket.
    Off the GPU the same static-input step runs eagerly, so its plumbing is testable on
    the CPU."""

    def __init__(self, network: nn.Module, kv_cache: KVCache, max_batch_size: int, blocks_per_sequence: int,
                 scratch_block: int, max_context: int, device: torch.device) -> None:
        super().__init__(kv_cache, blocks_per_sequence, scratch_block)
        self.pool = self.capture(network, kv_cache, [(size, size) for size in batch_buckets(max_batch_size)],
                                 max_context, device)

    def run(self, block_tables: list[list[int]], cached: list[int],
            new_tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits [n, vocab] and greedy tokens [n] for one new token per sequence
        (`cached` tokens already in its blocks `block_tables`)."""
        bucket = min(size for size in self.graphs if size >= len(block_tables))
        return self.run_in(self.graphs[bucket], block_tables, cached, new_tokens)


class PromptGraphs(_GraphSet):
    """The graphs of one sequence's step of 2..`max_tokens` new tokens (a prompt, or a chunk
    of one after its cached tokens), one per token-count bucket; padding tokens are
    computed and their K/V go to the scratch block. Off the GPU they run eagerly."""

    def __init__(self, network: nn.Module, kv_cache: KVCache, max_tokens: int, blocks_per_sequence: int,
                 scratch_block: int, max_context: int, device: torch.device, pool=None) -> None:
        super().__init__(kv_cache, blocks_per_sequence, scratch_block)
        self.capture(network, kv_cache, [(1, tokens) for tokens in token_buckets(max_tokens)], max_context,
                     device, pool)

    def takes(self, new_tokens: list[list[int]]) -> bool:
        """Whether a graph runs this step: one sequence, within the largest bucket."""
        return len(new_tokens) == 1 and 1 < len(new_tokens[0]) <= max(self.graphs)

    def run(self, block_tables: list[list[int]], cached: list[int],
            new_tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits [1, vocab] of the sequence's last new token and its argmax."""
        bucket = min(size for size in self.graphs if size >= len(new_tokens[0]))
        return self.run_in(self.graphs[bucket], block_tables, cached, new_tokens)
