"""The generation session: loads an engine, sizes the paged KV cache, checks
requests against the engine's limits, and runs the scheduler's steps (packed
prefill and decode forwards, CUDA-graph decode steps) until every request stops."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from glm_engine import GlmEngineError
from glm_engine.engine import Engine, load_engine
from glm_engine.config import BuildConfig, ModelConfig
from glm_engine.memory import check_fits
from glm_engine.quantization import dequantize_weights
from glm_engine.runtime.block_manager import BlockManager
from glm_engine.runtime.kv_cache import AttentionBatch, KVCache, make_attention_batch
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.runtime.scheduler import Scheduler, StepResult
from model import build_model

logger = logging.getLogger("session")


def resolve_device(name: str | None) -> torch.device:
    """`name` (cpu, cuda or cuda:N), or CUDA when available and the CPU otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise GlmEngineError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise GlmEngineError(f"--device {name!r}: engines run on cpu or cuda (cuda:N)")
    if device.type == "cpu":
        return torch.device("cpu")  # one CPU device, whatever index was given
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GlmEngineError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise GlmEngineError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def runs_kernels(build: BuildConfig, device: torch.device) -> bool:
    """Whether the engine's Triton kernels run: on a GPU, or on the CPU under Triton's
    interpreter (TRITON_INTERPRET=1, for the kernel tests); otherwise the reference
    ops compute the same network on the CPU."""
    return build.uses_triton and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def reference_ops(build: BuildConfig) -> BuildConfig:
    """The build flags with every kernel choice off: what the model computes with when
    the kernels cannot run (the engine's own flags still rule sizes and scheduling)."""
    return dataclasses.replace(build, use_gpt_attention_plugin=None, use_layernorm_plugin=None,
                               use_gemm_plugin=None, context_fmha=None, weight_only_precision=None,
                               use_inflight_batching=False)


def check_triton() -> None:
    try:
        import triton  # noqa: F401
    except ImportError:
        raise GlmEngineError("this engine's plugins are Triton kernels and triton is not installed; "
                             "pip install triton, or run on the CPU (--device cpu)") from None


class Session:
    """Generates with one loaded engine: static batches (`generate`) or any number of
    requests under in-flight batching (`generate_requests`), both through the scheduler
    over one block-addressed KV cache."""

    def __init__(self, engine: Engine | str | Path, device: str | torch.device | None = None,
                 cuda_graphs: bool = True, kv_cache_free_gpu_mem_fraction: float | None = None,
                 max_tokens_in_paged_kv_cache: int | None = None) -> None:
        self.device = resolve_device(str(device) if device is not None else None)
        start = time.perf_counter()
        if not isinstance(engine, Engine):
            engine = load_engine(engine, self.device)
        loaded = time.perf_counter()
        self.engine = engine
        self.model_config = config = engine.model_config
        self.build_config = build = engine.build_config
        # The flags the network computes with: the engine's, or the reference ops where
        # its Triton kernels cannot run (weight-only layers dequantized once, here).
        self.ops_config = build
        if runs_kernels(build, self.device):
            check_triton()
        elif build.uses_triton:
            logger.info("the engine's plugins are Triton kernels, which need a GPU: running the reference ops on "
                        "the %s%s", self.device, ", weight-only layers dequantized to " + build.dtype
                        if build.weight_only_precision else "")
            self.ops_config = reference_ops(build)
            engine.weights = dequantize_weights(engine.weights, build.torch_dtype)
        self.model = build_model(config, self.ops_config, engine.weights, self.device)
        engine.weights = {}  # the model holds them now
        block_size = build.tokens_per_block
        self.blocks_per_sequence = -(-build.max_sequence_len // block_size)
        num_blocks = kv_pool_blocks(build, config, self.device, self.blocks_per_sequence,
                                    kv_cache_free_gpu_mem_fraction, max_tokens_in_paged_kv_cache)
        block_bytes = (2 * config.num_layers * block_size * config.multi_query_group_num * config.kv_channels
                       * build.torch_dtype.itemsize)
        check_fits(f"the KV cache ({num_blocks + 1} blocks of {block_size} tokens)", (num_blocks + 1) * block_bytes,
                   self.device, "lower --max_tokens_in_paged_kv_cache, or rebuild with a smaller --max_batch_size, "
                   "--max_input_len or --max_output_len")
        self.block_manager = BlockManager(num_blocks, block_size)
        # The last block takes the K/V of padding: graph padding rows and padded prompts.
        self.scratch_block = num_blocks
        self.kv_cache = KVCache(config.num_layers, num_blocks + 1, block_size, config.multi_query_group_num,
                                config.kv_channels, build.torch_dtype, self.device)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB)%s", num_blocks, block_size,
                    num_blocks * block_size, self.kv_cache.nbytes / 2**30,
                    ", paged" if build.paged_kv_cache else ", a full sequence per batch row")
        self.decode_graphs = None
        built = time.perf_counter()
        if cuda_graphs and self.device.type == "cuda" and self.ops_config.use_gpt_attention_plugin is not None:
            from glm_engine.runtime.cuda_graphs import DecodeGraphs

            self.decode_graphs = DecodeGraphs(self)
        # Seconds per start-up stage, for benchmark.py (a lazy CUDA-graph capture would hide in the first step).
        self.startup_seconds = {"load_engine": loaded - start, "build_model": built - loaded,
                                "capture_graphs": time.perf_counter() - built}

    def check_prompt(self, index: int, prompt: list[int], max_new_tokens: int) -> None:
        """Raises GlmEngineError when a request breaks the engine's limits."""
        build, vocab = self.build_config, self.model_config.vocab_size
        if max_new_tokens > build.max_output_len:
            raise GlmEngineError(f"max_output_len {max_new_tokens} exceeds the engine's max_output_len "
                                 f"{build.max_output_len}; ask for fewer tokens or rebuild")
        if not prompt:
            raise GlmEngineError(f"prompt {index} is empty")
        if len(prompt) > build.max_input_len:
            raise GlmEngineError(f"prompt {index} has {len(prompt)} tokens, over the engine's "
                                 f"max_input_len {build.max_input_len}; shorten it or rebuild")
        bad = [token for token in prompt if not 0 <= token < vocab]
        if bad:
            raise GlmEngineError(f"prompt {index} holds token id {bad[0]}, outside the vocabulary [0, {vocab})")

    def check_request(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """Checks a static batch: every prompt, and no more prompts than max_batch_size."""
        if not prompts:
            raise GlmEngineError("no prompts given")
        if len(prompts) > self.build_config.max_batch_size:
            raise GlmEngineError(f"{len(prompts)} prompts exceed the engine's max_batch_size "
                                 f"{self.build_config.max_batch_size}; send fewer or rebuild with a larger "
                                 "--max_batch_size")
        for index, prompt in enumerate(prompts):
            self.check_prompt(index, prompt, max_new_tokens)

    def attention_batch(self, block_tables: list[list[int]], cached: list[int],
                        new_token_counts: list[int]) -> AttentionBatch:
        """Cache addresses of one step; the reference attention's inputs only when it runs."""
        build = self.ops_config
        plugin_only = build.use_gpt_attention_plugin is not None and (
            build.context_fmha is not None or max(new_token_counts) == 1)
        return make_attention_batch(block_tables, cached, new_token_counts, build.tokens_per_block, self.device,
                                    build.torch_dtype, build.max_sequence_len, reference_fields=not plugin_only)

    def forward(self, block_tables: list[list[int]], cached: list[int], new_tokens: list[list[int]],
                logit_rows: list[int] | None = None) -> torch.Tensor:
        """Eager forward of the packed new tokens of sequences with `cached` tokens already
        in their cache blocks `block_tables`; float32 logits [B, vocab] of each sequence's
        last new token, or of its token number `logit_rows[i]` when given."""
        batch = self.attention_batch(block_tables, cached, list(map(len, new_tokens)))
        input_ids = torch.tensor([token for tokens in new_tokens for token in tokens], device=self.device)
        rows = batch.last_token_index
        if logit_rows is not None:  # sequence i's token logit_rows[i], counted from its first new token
            rows = rows - batch.new_token_counts + 1 + torch.tensor(logit_rows, device=self.device)
        return self.model.logits(self.model(input_ids, batch, self.kv_cache)[rows])

    def run_step(self, block_tables: list[list[int]], cached: list[int],
                 new_tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of the scheduler: float32 logits [B, vocab] of each sequence's last new
        token and their argmax. A captured decode graph when every sequence has one new
        token; without --remove_input_padding, prompts are padded to the longest."""
        if self.decode_graphs is not None and all(len(tokens) == 1 for tokens in new_tokens):
            return self.decode_graphs.run(block_tables, cached, [tokens[0] for tokens in new_tokens])
        logit_rows = None
        if not self.build_config.remove_input_padding and any(len(tokens) > 1 for tokens in new_tokens):
            longest = max(map(len, new_tokens))
            logit_rows = [len(tokens) - 1 for tokens in new_tokens]
            # Padding runs like the original's padded mode: computed, its K/V written to the scratch block.
            block_tables = [table + [self.scratch_block] * (self.block_manager.blocks_for(done + longest)
                                                           - len(table))
                            for table, done in zip(block_tables, cached)]
            new_tokens = [tokens + [PAD_TOKEN] * (longest - len(tokens)) for tokens in new_tokens]
        logits = self.forward(block_tables, cached, new_tokens, logit_rows)
        return logits, logits.argmax(dim=-1)

    @torch.inference_mode()
    def prompt_logits(self, prompt: list[int]) -> torch.Tensor:
        """Float32 logits [len(prompt), vocab] at every position of one prompt."""
        self.check_request([prompt], 1)
        block_table: list[int] = []
        if not self.block_manager.grow(block_table, len(prompt)):
            raise GlmEngineError("the KV cache pool is too small for this prompt")
        try:
            batch = self.attention_batch([block_table], [0], [len(prompt)])
            input_ids = torch.tensor(prompt, dtype=torch.long, device=self.device)
            return self.model.logits(self.model(input_ids, batch, self.kv_cache))
        finally:
            self.block_manager.release(block_table)

    @torch.inference_mode()
    def stream_requests(self, prompts: list[list[int]], samplings: list[SamplingConfig],
                        max_in_flight: int | None = None) -> Iterator[StepResult]:
        """Runs every request (any number) under in-flight batching, at most
        `max_in_flight` at a time (default max_batch_size); yields each step's result."""
        if not prompts:
            raise GlmEngineError("no prompts given")
        scheduler = Scheduler(self, max_in_flight)
        for index, (prompt, sampling) in enumerate(zip(prompts, samplings, strict=True)):
            scheduler.add(index, prompt, sampling)
        try:
            while scheduler.has_work:
                yield scheduler.step()
        finally:
            for sequence in scheduler.running:  # a consumer that stops early leaks no blocks
                self.block_manager.release(sequence.block_table)

    def generate_requests(self, prompts: list[list[int]], samplings: list[SamplingConfig],
                          max_in_flight: int | None = None) -> list[list[int]]:
        """Generated ids of each request, in request order (in-flight batching)."""
        outputs: list[list[int]] = [[] for _ in prompts]
        for step in self.stream_requests(prompts, samplings, max_in_flight):
            for index, token in step.tokens:
                outputs[index].append(token)
        return outputs

    def generate_stream(self, prompts: list[list[int]],
                        sampling: SamplingConfig) -> Iterator[list[tuple[int, int]]]:
        """A static batch (at most max_batch_size prompts), all with `sampling`: yields,
        after each step, the (prompt index, token) pairs it produced; a sequence stops at
        `sampling.end_id` (not yielded) or after max_new_tokens."""
        self.check_request(prompts, sampling.max_new_tokens)
        for step in self.stream_requests(prompts, [sampling] * len(prompts)):
            yield step.tokens

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
        """Generated ids of each prompt of a static batch (prompt and end token excluded)."""
        outputs: list[list[int]] = [[] for _ in prompts]
        for step in self.generate_stream(prompts, sampling):
            for index, token in step:
                outputs[index].append(token)
        return outputs


PAD_TOKEN = 0  # what padded prompts are filled with (never attended to)


def kv_pool_blocks(build: BuildConfig, config: ModelConfig, device: torch.device, blocks_per_sequence: int,
                   free_fraction: float | None, max_tokens: int | None) -> int:
    """Blocks of the KV pool. Without --paged_kv_cache: a full sequence per batch row.
    Paged: `max_tokens` tokens when given, else `free_fraction` (default 0.9) of the GPU
    memory free now (on the CPU, as without paging; `free_fraction` is refused there)."""
    given = [name for name, value in (("--kv_cache_free_gpu_mem_fraction", free_fraction),
                                      ("--max_tokens_in_paged_kv_cache", max_tokens)) if value is not None]
    if not build.paged_kv_cache:
        if given:
            raise GlmEngineError(f"{given[0]} sizes the paged KV cache; this engine was built without "
                                 "--paged_kv_cache")
        return build.max_batch_size * blocks_per_sequence
    block_size = build.tokens_per_block
    if max_tokens is not None:
        if max_tokens < block_size:
            raise GlmEngineError(f"--max_tokens_in_paged_kv_cache {max_tokens} is under one block of "
                                 f"{block_size} tokens")
        return max_tokens // block_size
    if free_fraction is not None and not 0.0 < free_fraction <= 1.0:
        raise GlmEngineError(f"--kv_cache_free_gpu_mem_fraction must be within (0, 1], got {free_fraction}")
    if device.type != "cuda":
        if free_fraction is not None:
            raise GlmEngineError("--kv_cache_free_gpu_mem_fraction sizes the pool from free GPU memory; on the "
                                 "CPU use --max_tokens_in_paged_kv_cache")
        return build.max_batch_size * blocks_per_sequence
    bytes_per_block = (2 * config.num_layers * block_size * config.multi_query_group_num * config.kv_channels
                       * build.torch_dtype.itemsize)
    free_bytes, _ = torch.cuda.mem_get_info(device)
    blocks = int(free_bytes * (0.9 if free_fraction is None else free_fraction)) // bytes_per_block - 1
    if blocks < blocks_per_sequence:
        raise GlmEngineError(f"only {blocks} KV-cache blocks fit in free GPU memory, fewer than one sequence's "
                             f"{blocks_per_sequence}; raise --kv_cache_free_gpu_mem_fraction")
    return blocks
