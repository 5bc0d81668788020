"""Runs a network's forward steps on one device: owns the network, the KV cache,
the attention backend that builds each step's metadata, and the CUDA graphs of
decode and prompt steps where that backend supports them. Its input is a step as
the scheduler plans it (each sequence's block table, cached token count and new
tokens); it knows nothing of requests."""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import nn

from glm_engine.runtime.attention import AttentionBackend, StepLayout
from glm_engine.config import BuildConfig, ModelConfig
from glm_engine.runtime.ops import Ops
from glm_engine.runtime.cuda_graphs import DecodeGraphs, PromptGraphs, VerifyGraphs
from glm_engine.runtime.kv_cache import KVCache, blocks_per_sequence, kv_cache_dtype

PAD_TOKEN = 0  # what padded prompts are filled with (never attended to)


def graphs_to_capture(attention: AttentionBackend, build: BuildConfig, device: torch.device,
                      cuda_graphs: bool) -> tuple[bool, bool]:
    """Whether a runner captures (decode graphs, prompt graphs): on a GPU, when asked and the
    attention backend supports them. Several ranks run prompts eagerly: the prompt graphs
    (NCCL inside) have not run on several GPUs yet."""
    decode = cuda_graphs and device.type == "cuda" and attention.supports_cuda_graphs
    return decode, decode and attention.supports_prompt_graphs and build.world_size == 1


class ModelRunner:
    """Executes forward steps over `num_blocks` KV-cache blocks (plus one scratch block
    that takes the K/V of padding: graph padding rows and padded prompts)."""

    def __init__(self, network: nn.Module, ops: Ops, config: ModelConfig, build: BuildConfig, device: torch.device,
                 num_blocks: int, cuda_graphs: bool = True, kv_cache_scales: torch.Tensor | None = None,
                 verify_shapes: tuple[int, int] | None = None) -> None:
        """`verify_shapes`: (most sequences, most draft tokens a sequence) of the speculative
        verify steps to capture, where prompt steps are captured too."""
        self.network, self.attention, self.device = network, ops.attention, device
        self.block_size = build.tokens_per_block
        self.blocks_per_sequence = blocks_per_sequence(build)
        self.scratch_block = num_blocks
        self.remove_input_padding = build.remove_input_padding
        self.kv_cache = KVCache(config.num_layers, num_blocks + 1, self.block_size, config.multi_query_group_num,
                                config.kv_channels, kv_cache_dtype(build), device, kv_cache_scales)
        self.decode_graphs = self.prompt_graphs = self.verify_graphs = None
        decode_graphs, prompt_graphs = graphs_to_capture(self.attention, build, device, cuda_graphs)
        if decode_graphs:
            self.decode_graphs = DecodeGraphs(network, self.attention, self.kv_cache, build.max_batch_size,
                                              self.blocks_per_sequence, self.scratch_block, device)
        if prompt_graphs:
            self.prompt_graphs = PromptGraphs(network, self.attention, self.kv_cache, build.max_input_len,
                                              self.blocks_per_sequence, self.scratch_block, device,
                                              self.decode_graphs.pool)
            if verify_shapes is not None:
                self.verify_graphs = VerifyGraphs(network, self.attention, self.kv_cache, *verify_shapes,
                                                  self.blocks_per_sequence, self.scratch_block, device,
                                                  self.decode_graphs.pool)

    def forward(self, block_tables: list[list[int]], cached: list[int], new_tokens: list[list[int]],
                logit_rows: list[list[int]] | None = None) -> torch.Tensor:
        """Eager forward of the packed new tokens of sequences with `cached` tokens already
        in their cache blocks `block_tables`; float32 logits [R, vocab] of each sequence's
        last new token, or of its token numbers `logit_rows[i]` when given (R rows in all)."""
        counts = list(map(len, new_tokens))
        metadata = self.attention.metadata(StepLayout.of(block_tables, cached, counts, self.block_size))
        input_ids = torch.tensor([token for tokens in new_tokens for token in tokens], device=self.device)
        starts = accumulate(counts[:-1], initial=0)
        picks = logit_rows if logit_rows is not None else [[count - 1] for count in counts]
        rows = torch.tensor([start + pick for start, chosen in zip(starts, picks) for pick in chosen],
                            device=self.device)
        return self.network.logits(self.network(input_ids, metadata, self.kv_cache)[rows])

    def execute(self, block_tables: list[list[int]], cached: list[int], new_tokens: list[list[int]],
                logit_counts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One scheduled step: float32 logits [B, vocab] of each sequence's last new token
        and their argmax; with `logit_counts` (a speculative verify step), of each sequence's
        last logit_counts[i] new tokens, packed [sum, vocab]. A captured decode graph when
        every sequence has one new token, a prompt graph for one sequence's short prompt (or
        chunk); without --remove_input_padding, prompts are padded to the longest."""
        if self.decode_graphs is not None and all(len(tokens) == 1 for tokens in new_tokens):
            return self.decode_graphs.run(block_tables, cached, new_tokens)
        if logit_counts is None and self.prompt_graphs is not None and self.prompt_graphs.takes(new_tokens):
            return self.prompt_graphs.run(block_tables, cached, new_tokens)
        if logit_counts is not None and self.verify_graphs is not None and self.verify_graphs.takes(new_tokens):
            return self.verify_graphs.run(block_tables, cached, new_tokens, logit_counts)
        counts = logit_counts or [1] * len(new_tokens)
        logit_rows = [list(range(len(tokens) - count, len(tokens))) for tokens, count in zip(new_tokens, counts)]
        if not self.remove_input_padding and any(len(tokens) > 1 for tokens in new_tokens):
            longest = max(map(len, new_tokens))
            # Padding runs like the original's padded mode: computed, its K/V written to the scratch block.
            block_tables = [table + [self.scratch_block] * (-(-(done + longest) // self.block_size) - len(table))
                            for table, done in zip(block_tables, cached)]
            new_tokens = [tokens + [PAD_TOKEN] * (longest - len(tokens)) for tokens in new_tokens]
        logits = self.forward(block_tables, cached, new_tokens, logit_rows)
        return logits, logits.argmax(dim=-1)

    def prompt_logits(self, block_table: list[int], prompt: list[int]) -> torch.Tensor:
        """Float32 logits [len(prompt), vocab] at every position of one prompt whose K/V
        go to the blocks of `block_table`."""
        metadata = self.attention.metadata(StepLayout.of([block_table], [0], [len(prompt)], self.block_size))
        input_ids = torch.tensor(prompt, dtype=torch.long, device=self.device)
        return self.network.logits(self.network(input_ids, metadata, self.kv_cache))
