"""CUDA graphs of forward steps, captured at start-up and replayed with new inputs
copied into their static tensors; each runs the whole step (embedding, every
layer, final norm, output layer and greedy argmax):
- the decode step (one new token a sequence, the paged decode-attention kernel),
  one graph per batch-size bucket;
- on engines with context FMHA, the step of one sequence's prompt or prompt chunk
  of up to MAX_PROMPT_TOKENS tokens, one graph per token-count bucket. Run eagerly,
  such a step is bound by the host's kernel launches, not by the GPU.
Needs an attention backend whose kernels take fixed shapes (supports_cuda_graphs,
supports_prompt_graphs): its graph_inputs() lays out and binds the attention's part
of the static inputs. Padding tokens and padding rows write their K/V to a scratch
block."""

from __future__ import annotations

import torch
from torch import nn

from glm_engine.runtime.attention import AttentionBackend, GraphInputs
from glm_engine.runtime.kv_cache import KVCache

# Longer prompts keep the GPU busier than the host (and from 1024 tokens take SDPA, eagerly).
MAX_PROMPT_TOKENS = 512


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
    fills: the tokens' ids, then the attention backend's part (`attention_inputs`)."""

    def __init__(self, network: nn.Module, kv_cache: KVCache, attention_inputs: GraphInputs, sequences: int,
                 tokens: int, device: torch.device, pool, every_token: bool = False) -> None:
        """`every_token`: the logits of every token (verify steps), not of each sequence's last."""
        self.sequences, self.tokens, self.attention_inputs = sequences, tokens, attention_inputs
        self.inputs = torch.tensor(self.static_inputs([], [], []), dtype=torch.int64).to(device)
        input_ids = self.inputs[:tokens]
        metadata = attention_inputs.bind(self.inputs[tokens:])
        last_token_index = None if every_token else attention_inputs.last_token_index

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            attention_inputs.prepare()
            hidden = network(input_ids, metadata, kv_cache)
            logits = network.logits(hidden if last_token_index is None else hidden[last_token_index])
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

    def static_inputs(self, block_tables: list[list[int]], cached: list[int],
                      new_tokens: list[list[int]]) -> list[int]:
        """A step's values for the static inputs, padded to the graph's shape (padding
        tokens are token 0); capture fills them with the empty step."""
        inputs: list[int] = []
        for tokens in new_tokens:
            inputs += tokens
        inputs += [0] * (self.tokens - len(inputs))
        self.attention_inputs.append_step(inputs, block_tables, cached, map(len, new_tokens))
        return inputs

    def replay(self) -> None:
        if self.graph is None:
            self.logits, self.greedy = self.step()
        else:
            self.graph.replay()


class _GraphSet:
    """Graphs of one kind keyed by their bucket, over one KV cache, all in one memory pool."""

    def __init__(self, attention: AttentionBackend, kv_cache: KVCache, blocks_per_sequence: int,
                 scratch_block: int) -> None:
        self.attention, self.width, self.scratch = attention, blocks_per_sequence, scratch_block
        self.block_size = kv_cache.block_size
        self.graphs: dict[int, _Graph] = {}

    def capture(self, network: nn.Module, kv_cache: KVCache, shapes: list[tuple[int, int]], device: torch.device,
                pool=None, every_token: bool = False):
        """Captures a graph for each (sequences, tokens), largest first, sharing `pool`
        (a new one when None), keyed by `key_of` its shape; returns the pool."""
        for sequences, tokens in sorted(shapes, reverse=True):
            attention_inputs = self.attention.graph_inputs(sequences, tokens, self.width, self.block_size,
                                                           self.scratch)
            graph = _Graph(network, kv_cache, attention_inputs, sequences, tokens, device, pool, every_token)
            self.graphs[self.key_of(sequences, tokens)] = graph
            pool = graph.graph.pool() if graph.graph is not None else None
        return pool

    @staticmethod
    def key_of(sequences: int, tokens: int):
        """A graph's key in `graphs`: its token count (decode and prompt graphs)."""
        return tokens

    def run_in(self, graph: _Graph, block_tables: list[list[int]], cached: list[int],
               new_tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fills `graph`'s static inputs with the step and replays it: float32 logits
        [n, vocab] of each sequence's last new token and their argmax."""
        inputs = graph.static_inputs(block_tables, cached, new_tokens)
        graph.inputs.copy_(torch.tensor(inputs, dtype=torch.int64), non_blocking=True)
        graph.replay()
        count = len(block_tables)
        return graph.logits[:count], graph.greedy[:count]


class DecodeGraphs(_GraphSet):
    """The decode-step graphs of a network over one KV cache, one per batch-size bucket.
    Off the GPU the same static-input step runs eagerly, so its plumbing is testable on
    the CPU."""

    def __init__(self, network: nn.Module, attention: AttentionBackend, kv_cache: KVCache, max_batch_size: int,
                 blocks_per_sequence: int, scratch_block: int, device: torch.device) -> None:
        super().__init__(attention, kv_cache, blocks_per_sequence, scratch_block)
        self.pool = self.capture(network, kv_cache, [(size, size) for size in batch_buckets(max_batch_size)],
                                 device)

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

    def __init__(self, network: nn.Module, attention: AttentionBackend, kv_cache: KVCache, max_tokens: int,
                 blocks_per_sequence: int, scratch_block: int, device: torch.device, pool=None) -> None:
        super().__init__(attention, kv_cache, blocks_per_sequence, scratch_block)
        self.capture(network, kv_cache, [(1, tokens) for tokens in token_buckets(max_tokens)], device, pool)

    def takes(self, new_tokens: list[list[int]]) -> bool:
        """Whether a graph runs this step: one sequence, within the largest bucket."""
        return len(new_tokens) == 1 and 1 < len(new_tokens[0]) <= max(self.graphs)

    def run(self, block_tables: list[list[int]], cached: list[int],
            new_tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits [1, vocab] of the sequence's last new token and its argmax."""
        bucket = min(size for size in self.graphs if size >= len(new_tokens[0]))
        return self.run_in(self.graphs[bucket], block_tables, cached, new_tokens)


def draft_buckets(max_draft_len: int) -> list[int]:
    """The tokens a sequence feeds a verify step, by bucket: 1 + 1, 2, 4, ... drafts, and
    1 + max_draft_len."""
    buckets = [2]
    while buckets[-1] - 1 < max_draft_len:
        buckets.append(min(2 * (buckets[-1] - 1), max_draft_len) + 1)
    return buckets


class VerifyGraphs(_GraphSet):
    """The graphs of speculative verify steps: S sequences (a batch bucket up to
    `max_sequences`) of T tokens each (a draft bucket), the logits of every token. A step
    fits the smallest graph that holds it: each sequence's tokens are padded to T (the
    padding's K/V go to its own slots past its tokens, written over before any step reads
    them, or to the scratch block past its table) and the missing sequences are padding
    sequences over the scratch block. Off the GPU they run eagerly."""

    def __init__(self, network: nn.Module, attention: AttentionBackend, kv_cache: KVCache, max_sequences: int,
                 max_draft_len: int, blocks_per_sequence: int, scratch_block: int, device: torch.device,
                 pool=None) -> None:
        # Room in the tables for padding past a sequence that ends at the engine's longest.
        width = blocks_per_sequence + -(-max_draft_len // kv_cache.block_size)
        super().__init__(attention, kv_cache, width, scratch_block)
        shapes = [(sequences, sequences * tokens) for sequences in batch_buckets(max_sequences)
                  for tokens in draft_buckets(max_draft_len)]
        self.capture(network, kv_cache, shapes, device, pool, every_token=True)

    @staticmethod
    def key_of(sequences: int, tokens: int) -> tuple[int, int]:
        """(sequences, tokens a sequence)."""
        return sequences, tokens // sequences

    def takes(self, new_tokens: list[list[int]]) -> bool:
        """Whether a graph holds this step."""
        return any(len(new_tokens) <= sequences and max(map(len, new_tokens)) <= tokens
                   for sequences, tokens in self.graphs)

    def run(self, block_tables: list[list[int]], cached: list[int], new_tokens: list[list[int]],
            logit_counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits [sum(logit_counts), vocab] of each sequence's last logit_counts[i]
        new tokens, packed, and their argmax."""
        longest = max(map(len, new_tokens))
        sequences, tokens = min(key for key in self.graphs if key[0] >= len(new_tokens) and key[1] >= longest)
        graph = self.graphs[sequences, tokens]
        block_size, scratch = self.block_size, self.scratch
        spare = sequences - len(new_tokens)
        padded_tables = [table + [scratch] * (-(-(done + tokens) // block_size) - len(table))
                         for table, done in zip(block_tables, cached)] + [[scratch] * -(-tokens // block_size)] * spare
        padded_tokens = [fed + [0] * (tokens - len(fed)) for fed in new_tokens] + [[0] * tokens] * spare
        inputs = graph.static_inputs(padded_tables, list(cached) + [0] * spare, padded_tokens)
        graph.inputs.copy_(torch.tensor(inputs, dtype=torch.int64), non_blocking=True)
        graph.replay()
        rows = [row * tokens + index for row, (fed, count) in enumerate(zip(new_tokens, logit_counts))
                for index in range(len(fed) - count, len(fed))]
        index = torch.tensor(rows).to(graph.logits.device, non_blocking=True)  # queued: no wait for the replay
        return graph.logits[index], graph.greedy[index]
