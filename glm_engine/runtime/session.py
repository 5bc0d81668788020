"""The generation session: loads an engine, checks requests against its limits,
runs prefill then decode steps over packed sequences, samples and stops."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from glm_engine import GlmEngineError
from glm_engine.engine import Engine, load_engine
from glm_engine.runtime.kv_cache import AttentionBatch, KVCache, make_attention_batch, row_block_table
from glm_engine.runtime.sampling import SamplingConfig, sample
from model import build_model

def resolve_device(name: str | None) -> torch.device:
    """`name`, or CUDA when available and the CPU otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GlmEngineError(f"--device {name!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GlmEngineError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    return device


# Tokens per KV-cache block. Each batch row owns a fixed run of blocks until the
# paged-cache issue brings a block manager and --tokens_per_block.
TOKENS_PER_BLOCK = 64


class Session:
    """Generates for batches of tokenized prompts with one loaded engine."""

    def __init__(self, engine: Engine | str | Path, device: str | torch.device | None = None,
                 cuda_graphs: bool = True) -> None:
        self.device = resolve_device(str(device) if device is not None else None)
        start = time.perf_counter()
        if not isinstance(engine, Engine):
            engine = load_engine(engine, self.device)
        loaded = time.perf_counter()
        self.engine = engine
        self.model_config = config = engine.model_config
        self.build_config = build = engine.build_config
        if build.uses_triton and self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise GlmEngineError("this engine was built with plugins (Triton kernels), which need a CUDA GPU; "
                                 "run it on cuda, or set TRITON_INTERPRET=1 to interpret them on the CPU (slow)")
        self.model = build_model(config, build, engine.weights, self.device)
        engine.weights = {}  # the model holds them now
        self.blocks_per_row = -(-build.max_sequence_len // TOKENS_PER_BLOCK)
        # One run of blocks per batch row, and a last block that padded graph rows write to.
        self.scratch_block = build.max_batch_size * self.blocks_per_row
        self.kv_cache = KVCache(config.num_layers, self.scratch_block + 1, TOKENS_PER_BLOCK,
                                config.multi_query_group_num, config.kv_channels, build.torch_dtype, self.device)
        self.decode_graphs = None
        built = time.perf_counter()
        if cuda_graphs and self.device.type == "cuda" and build.use_gpt_attention_plugin is not None:
            from glm_engine.runtime.cuda_graphs import DecodeGraphs

            self.decode_graphs = DecodeGraphs(self)
        # Seconds per start-up stage, for benchmark.py (a lazy CUDA-graph capture would hide in the first step).
        self.startup_seconds = {"load_engine": loaded - start, "build_model": built - loaded,
                                "capture_graphs": time.perf_counter() - built}

    def block_table(self, row: int) -> list[int]:
        """The cache blocks of batch row `row`."""
        return row_block_table(row, self.blocks_per_row)

    def check_request(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """Raises GlmEngineError when a request breaks the engine's limits."""
        build, vocab = self.build_config, self.model_config.vocab_size
        if not prompts:
            raise GlmEngineError("no prompts given")
        if len(prompts) > build.max_batch_size:
            raise GlmEngineError(f"{len(prompts)} prompts exceed the engine's max_batch_size "
                                 f"{build.max_batch_size}; send fewer or rebuild with a larger --max_batch_size")
        if max_new_tokens > build.max_output_len:
            raise GlmEngineError(f"max_output_len {max_new_tokens} exceeds the engine's max_output_len "
                                 f"{build.max_output_len}; ask for fewer tokens or rebuild")
        for index, prompt in enumerate(prompts):
            if not prompt:
                raise GlmEngineError(f"prompt {index} is empty")
            if len(prompt) > build.max_input_len:
                raise GlmEngineError(f"prompt {index} has {len(prompt)} tokens, over the engine's "
                                     f"max_input_len {build.max_input_len}; shorten it or rebuild")
            bad = [token for token in prompt if not 0 <= token < vocab]
            if bad:
                raise GlmEngineError(f"prompt {index} holds token id {bad[0]}, outside the vocabulary "
                                     f"[0, {vocab})")

    def attention_batch(self, block_tables: list[list[int]], cached: list[int],
                        new_token_counts: list[int]) -> AttentionBatch:
        """Cache addresses of one step; the reference attention's inputs only when it runs."""
        build = self.build_config
        plugin_only = build.use_gpt_attention_plugin is not None and (
            build.context_fmha is not None or max(new_token_counts) == 1)
        return make_attention_batch(block_tables, cached, new_token_counts, TOKENS_PER_BLOCK, self.device,
                                    build.torch_dtype, build.max_sequence_len, reference_fields=not plugin_only)

    def forward(self, rows: list[int], cached: list[int], new_tokens: list[list[int]]) -> torch.Tensor:
        """Eager forward of the new tokens of batch rows `rows` (with `cached` tokens
        already in their cache); float32 logits [len(rows), vocab] of each row's last token."""
        batch = self.attention_batch([self.block_table(row) for row in rows], cached, list(map(len, new_tokens)))
        input_ids = torch.tensor([token for tokens in new_tokens for token in tokens], device=self.device)
        return self.model.logits(self.model(input_ids, batch, self.kv_cache)[batch.last_token_index])

    @torch.inference_mode()
    def prompt_logits(self, prompt: list[int]) -> torch.Tensor:
        """Float32 logits [len(prompt), vocab] at every position of one prompt."""
        self.check_request([prompt], 1)
        batch = self.attention_batch([self.block_table(0)], [0], [len(prompt)])
        input_ids = torch.tensor(prompt, dtype=torch.long, device=self.device)
        return self.model.logits(self.model(input_ids, batch, self.kv_cache))

    def _next_tokens(self, rows: list[int], cached: list[int], new_tokens: list[list[int]],
                     sampling: SamplingConfig, generator: torch.Generator) -> list[int]:
        """One step: a captured decode graph when every row has one new token, else eager."""
        if self.decode_graphs is not None and all(len(tokens) == 1 for tokens in new_tokens):
            logits, greedy = self.decode_graphs.run(rows, cached, [tokens[0] for tokens in new_tokens])
            return greedy.tolist() if sampling.greedy else sample(logits, sampling, generator).tolist()
        return sample(self.forward(rows, cached, new_tokens), sampling, generator).tolist()

    @torch.inference_mode()
    def generate_stream(self, prompts: list[list[int]],
                        sampling: SamplingConfig) -> Iterator[list[tuple[int, int]]]:
        """Yields, after each step, the (prompt index, token) pairs it produced; a
        sequence stops at `sampling.end_id` (not yielded) or after max_new_tokens.
        Prompt i uses batch row i of the cache."""
        self.check_request(prompts, sampling.max_new_tokens)
        generator = torch.Generator(device=self.device)
        if sampling.random_seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampling.random_seed)
        cached = [0] * len(prompts)
        produced = [0] * len(prompts)
        active = list(range(len(prompts)))
        new_tokens = [list(prompt) for prompt in prompts]
        while active:
            chosen = self._next_tokens(active, [cached[i] for i in active], [new_tokens[i] for i in active],
                                       sampling, generator)
            step, still_active = [], []
            for i, token in zip(active, chosen):
                cached[i] += len(new_tokens[i])
                if token == sampling.end_id:
                    continue
                step.append((i, token))
                produced[i] += 1
                new_tokens[i] = [token]
                if produced[i] < sampling.max_new_tokens:
                    still_active.append(i)
            active = still_active
            yield step

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
        """Generated ids of each prompt (prompt excluded, end token excluded)."""
        outputs: list[list[int]] = [[] for _ in prompts]
        for step in self.generate_stream(prompts, sampling):
            for index, token in step:
                outputs[index].append(token)
        return outputs
