"""The generation session: the engine loop over a model runner, a sampler and a scheduler.
It loads an engine, chooses its ops, has the caller's network builder build the
network (model.py's, handed in by model.load_session: the library never imports
the network), sizes the KV pool, checks requests against the engine's limits, and
runs planned steps (packed prefill and decode forwards, CUDA-graph decode steps)
until every request stops. APIs: generate / generate_stream (a static batch),
generate_requests / stream_requests (any number, in flight), prompt_logits and
decode_logits (accuracy checks)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from glm_engine import GlmEngineError
from glm_engine.config import BuildConfig, ModelConfig
from glm_engine.engine import Engine, engine_configs, load_engine
from glm_engine.kernel_cache import seed_triton_cache
from glm_engine.ops import Ops, select_ops
from glm_engine.quantization import dequantize_weights
from glm_engine.runtime.beam_search import BeamGroup, BeamSearch
from glm_engine.runtime.block_manager import BlockManager
from glm_engine.runtime.distributed import Launch, TensorParallel, launch_from_environment, rank_device
from glm_engine.runtime.model_runner import ModelRunner
from glm_engine.runtime.kv_cache import pool_blocks
from glm_engine.runtime.sampler import Sampler
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.runtime.scheduler import Scheduler, Sequence, StepResult
from glm_engine.runtime.stop_words import StopStrings
from glm_engine.tensor_parallel import rank_model_config
from glm_engine.tokenizer import ChatGLMTokenizer

# (model config, op table, runtime-layout weights, device) -> the network on that device
NetworkBuilder = Callable[[ModelConfig, Ops, dict[str, torch.Tensor], torch.device], nn.Module]

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
    if not torch.cuda.is_available():
        raise GlmEngineError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    if (device.index or 0) >= torch.cuda.device_count():
        raise GlmEngineError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_launch(engine_world_size: int, launch: Launch) -> None:
    """Raises GlmEngineError when the ranks started are not the engine's."""
    if launch.world_size == engine_world_size:
        return
    if launch.world_size == 1:
        raise GlmEngineError(f"the engine has {engine_world_size} ranks (built with --world_size "
                             f"{engine_world_size}); start one process per rank: torchrun --nproc_per_node "
                             f"{engine_world_size} <tool>.py ... (or mpirun -n {engine_world_size})")
    raise GlmEngineError(f"{launch.world_size} ranks were started but the engine was built with --world_size "
                         f"{engine_world_size}; start {engine_world_size}, or rebuild with --world_size "
                         f"{launch.world_size}")


def check_prompt(build: BuildConfig, vocab: int, index: int, prompt: list[int], max_new_tokens: int) -> None:
    """Raises GlmEngineError when request `index` breaks the engine's limits."""
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


class Session:
    """Generates with one loaded engine: static batches (`generate`) or any number of
    requests under in-flight batching (`generate_requests`), both through the scheduler
    over one block-addressed KV cache."""

    def __init__(self, engine: Engine | str | Path, build_network: NetworkBuilder,
                 device: str | torch.device | None = None, cuda_graphs: bool = True,
                 kv_cache_free_gpu_mem_fraction: float | None = None,
                 max_tokens_in_paged_kv_cache: int | None = None, tokenizer: ChatGLMTokenizer | None = None) -> None:
        """`tokenizer` decodes text for stop strings (default: the engine's own, when it has one)."""
        launch = launch_from_environment()
        _, build = (engine.model_config, engine.build_config) if isinstance(engine, Engine) else engine_configs(engine)
        check_launch(build.world_size, launch)  # on every rank, before any waits for the others
        self.device = resolve_device(rank_device(launch, str(device) if device is not None else None))
        start = time.perf_counter()
        if not isinstance(engine, Engine):
            engine = load_engine(engine, self.device, launch.rank)
        loaded = time.perf_counter()
        self.model_config = config = engine.model_config
        self.engine_dir, self.tokenizer = engine.directory, tokenizer
        self.build_config = build = engine.build_config
        self.parallel = TensorParallel(launch, self.device, config.vocab_size)
        rank_config = rank_model_config(config, build.world_size)  # the shape this rank computes
        ops = select_ops(rank_config, build, self.device, self.parallel)
        if ops.build.uses_triton and self.device.type == "cuda":
            seed_triton_cache(engine.directory, self.device)  # the kernels compiled at build, before any compiles
        weights = engine.weights
        if build.weight_only_precision and not ops.build.weight_only_precision:
            weights = dequantize_weights(weights, build.torch_dtype)  # the reference ops take dense weights
        prepared = ops.prepare_weights(weights)
        network = build_network(rank_config, ops, prepared, self.device)
        engine.weights = {}  # the network holds them now
        if prepared is not weights and self.device.type == "cuda":
            del weights  # replaced by their shuffled copies: their memory goes back before the KV pool is sized
            torch.cuda.empty_cache()
        num_blocks = self.parallel.minimum(pool_blocks(build, rank_config, self.device, kv_cache_free_gpu_mem_fraction,
                                                       max_tokens_in_paged_kv_cache))
        self.block_manager = BlockManager(num_blocks, build.tokens_per_block)
        built = time.perf_counter()
        self.runner = ModelRunner(network, ops, rank_config, build, self.device, num_blocks, cuda_graphs)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB%s)%s", num_blocks, build.tokens_per_block,
                    num_blocks * build.tokens_per_block, self.runner.kv_cache.nbytes / 2**30,
                    " on each rank" if build.world_size > 1 else "",
                    ", paged" if build.paged_kv_cache else ", a full sequence per batch row")
        # Unseeded requests draw their seeds from here: the same on every rank.
        self.seeds = random.Random(self.parallel.shared_seed())
        # Seconds per start-up stage, for benchmark.py (a lazy CUDA-graph capture would hide in the first step).
        self.startup_seconds = {"load_engine": loaded - start, "build_model": built - loaded,
                                "capture_graphs": time.perf_counter() - built}

    @property
    def is_main_rank(self) -> bool:
        """Whether this process prints and writes files (rank 0, or the only one)."""
        return self.parallel.is_main

    def check_prompt(self, index: int, prompt: list[int], max_new_tokens: int) -> None:
        """Raises GlmEngineError when a request breaks the engine's limits."""
        check_prompt(self.build_config, self.model_config.vocab_size, index, prompt, max_new_tokens)

    def check_request(self, prompts: list[list[int]], max_new_tokens: int, num_beams: int = 1) -> None:
        """Checks a static batch: every prompt, and no more prompts (times beams) than
        max_batch_size."""
        if not prompts:
            raise GlmEngineError("no prompts given")
        if len(prompts) * num_beams > self.build_config.max_batch_size:
            beams = f" x {num_beams} beams" if num_beams > 1 else ""
            raise GlmEngineError(f"{len(prompts)} prompts{beams} exceed the engine's max_batch_size "
                                 f"{self.build_config.max_batch_size}; send fewer or rebuild with a larger "
                                 "--max_batch_size")
        for index, prompt in enumerate(prompts):
            self.check_prompt(index, prompt, max_new_tokens)

    def new_scheduler(self, max_in_flight: int | None = None, tokens_per_step: int | None = None,
                      chunked_prefill: bool = False) -> Scheduler:
        """A scheduler over this session's KV pool: at most `max_in_flight` sequences per
        step (default and ceiling: max_batch_size), `tokens_per_step` tokens (Scheduler's),
        with the sampler that chooses its steps' tokens."""
        ceiling = self.build_config.max_batch_size
        max_in_flight = ceiling if max_in_flight is None else min(max_in_flight, ceiling)
        return Scheduler(self.block_manager, max_in_flight, tokens_per_step, chunked_prefill, Sampler(max_in_flight))

    def submit(self, scheduler: Scheduler, index: int, prompt: list[int], sampling: SamplingConfig) -> None:
        """Queues request `index`; refuses one the engine or the KV pool can never hold."""
        self.check_prompt(index, prompt, sampling.max_new_tokens)
        vocab = self.model_config.vocab_size
        if any(token >= vocab for word in sampling.bad_words for token in word):
            raise GlmEngineError(f"a bad word of request {index} holds a token id outside the vocabulary [0, {vocab})")
        beams = sampling.num_beams
        if beams > scheduler.max_in_flight:
            raise GlmEngineError(f"request {index} asks for {beams} beams, more than the {scheduler.max_in_flight} "
                                 "sequences in flight; use fewer beams or a larger --max_batch_size")
        # Beams recomputed after a preemption hold their prompts apart: the pool must hold them so.
        if not scheduler.fits(len(prompt) + sampling.max_new_tokens, copies=beams):
            manager = self.block_manager
            flags = "--max_tokens_in_paged_kv_cache" if self.device.type != "cuda" else \
                "--kv_cache_free_gpu_mem_fraction or --max_tokens_in_paged_kv_cache"  # the CPU takes only the first
            raise GlmEngineError(f"prompt {index} needs {beams} x {len(prompt) + sampling.max_new_tokens} tokens of "
                                 f"KV cache, more than the pool's {manager.num_blocks * manager.block_size}; raise "
                                 f"{flags}")
        seed = self.seeds.getrandbits(63) if sampling.random_seed is None else sampling.random_seed
        group = None
        if beams > 1:
            group = BeamGroup(BeamSearch(beams, sampling.length_penalty, sampling.early_stopping, sampling.end_id,
                                         len(prompt), sampling.max_new_tokens))
        scheduler.add(Sequence(index, list(prompt), sampling, seed, stop=self._stop_strings(index, sampling),
                               group=group))

    def _stop_strings(self, index: int, sampling: SamplingConfig) -> StopStrings | None:
        """The watcher of a request's stop strings, which are matched on decoded text."""
        if not sampling.stop_words:
            return None
        if self.tokenizer is None:
            if not (Path(self.engine_dir) / "tokenizer.model").is_file():
                raise GlmEngineError(f"request {index} has stop words, which are matched on text, and the engine "
                                     "has no tokenizer; pass one (run.py --tokenizer_dir)")
            self.tokenizer = ChatGLMTokenizer.from_dir(self.engine_dir)
        return StopStrings(sampling.stop_words, self.tokenizer)

    @torch.inference_mode()
    def step(self, scheduler: Scheduler) -> StepResult:
        """One planned step: the runner's forward, the sampler's tokens, then the scheduler's
        bookkeeping (each sequence's token recorded, finished ones retired)."""
        plan = scheduler.schedule()
        if plan.block_copies:  # beams about to write into blocks they shared
            self.runner.kv_cache.copy_blocks(plan.block_copies)
        logits, greedy = self.runner.execute(plan.block_tables, plan.cached, plan.new_tokens)
        sampled = scheduler.sampler.sample(plan, logits, greedy)
        return scheduler.postprocess(plan, sampled)

    @torch.inference_mode()
    def prompt_logits(self, prompt: list[int]) -> torch.Tensor:
        """Float32 logits [len(prompt), vocab] at every position of one prompt."""
        self.check_request([prompt], 1)
        with self._blocks_for(prompt) as block_table:
            return self.runner.prompt_logits(block_table, prompt)

    def decode_logits(self, prompt: list[int], decoded: int) -> torch.Tensor:
        """Float32 logits [decoded, vocab] at the last `decoded` positions of one prompt, each
        from a decode step (one new token; the decode graphs when captured) after a prefill
        of the tokens before them: generation's path, fed the prompt's tokens."""
        self.check_request([prompt], 1)
        if not 0 < decoded < len(prompt):
            raise GlmEngineError(f"decode_logits: {decoded} decoded positions of a {len(prompt)}-token prompt; "
                                 "take at least 1 and fewer than the prompt's tokens")
        with self._blocks_for(prompt) as block_table:
            first = len(prompt) - decoded
            self.runner.execute([block_table], [0], [prompt[:first]])
            # Cloned: a decode graph's logits are its static output, overwritten by the next step.
            return torch.cat([self.runner.execute([block_table], [position], [[prompt[position]]])[0].clone()
                              for position in range(first, len(prompt))])

    @contextmanager
    def _blocks_for(self, prompt: list[int]) -> Iterator[list[int]]:
        """A block table holding `prompt`'s K/V outside any scheduler, released afterwards."""
        block_table: list[int] = []
        if not self.block_manager.grow(block_table, len(prompt)):
            raise GlmEngineError("the KV cache pool is too small for this prompt")
        try:
            yield block_table
        finally:
            self.block_manager.release(block_table)

    def stream_requests(self, prompts: list[list[int]], samplings: list[SamplingConfig],
                        max_in_flight: int | None = None) -> Iterator[StepResult]:
        """Runs every request (any number) under in-flight batching, at most
        `max_in_flight` at a time (default max_batch_size); yields each step's result."""
        if not prompts:
            raise GlmEngineError("no prompts given")
        scheduler = self.new_scheduler(max_in_flight)
        for index, (prompt, sampling) in enumerate(zip(prompts, samplings, strict=True)):
            self.submit(scheduler, index, prompt, sampling)
        try:
            while scheduler.has_work:
                yield self.step(scheduler)
        finally:
            scheduler.release_all()  # a consumer that stops early leaks no blocks

    def _collect(self, prompts: list[list[int]], samplings: list[SamplingConfig],
                 max_in_flight: int | None) -> tuple[list[list[int]], list[list[float]], list[list]]:
        """Runs every request in flight; per request its ids, log-probs (when asked) and best
        beams (beam requests)."""
        outputs: list[list[int]] = [[] for _ in prompts]
        log_probs: list[list[float]] = [[] for _ in prompts]
        beams: list[list] = [[] for _ in prompts]
        for step in self.stream_requests(prompts, samplings, max_in_flight):
            for index, token in step.tokens:
                outputs[index].append(token)
            for index, log_prob in step.log_probs:
                log_probs[index].append(log_prob)
            for index, best in step.beams:
                beams[index] = best
        return outputs, log_probs, beams

    def generate_requests(self, prompts: list[list[int]], samplings: list[SamplingConfig],
                          max_in_flight: int | None = None) -> list[list[int]]:
        """Generated ids of each request, in request order (in-flight batching)."""
        return self._collect(prompts, samplings, max_in_flight)[0]

    def generate_with_log_probs(self, prompts: list[list[int]], samplings: list[SamplingConfig],
                                max_in_flight: int | None = None) -> tuple[list[list[int]], list[list[float]]]:
        """Generated ids of each request and, for requests with output_log_probs, each
        token's log-probability under the distribution it was chosen from (greedy: the
        softmax of the adjusted logits; sampled: after temperature, top-k and top-p)."""
        outputs, log_probs, _ = self._collect(prompts, samplings, max_in_flight)
        return outputs, log_probs

    def generate_beams(self, prompts: list[list[int]], samplings: list[SamplingConfig],
                       max_in_flight: int | None = None) -> list[list[tuple[list[int], float | None]]]:
        """Each request's num_return_sequences best beams (ids, Hugging Face's score:
        cumulative log-probability / length ** length_penalty), best first; a one-beam
        request gives its output with no score (None)."""
        outputs, _, beams = self._collect(prompts, samplings, max_in_flight)
        return [found or [(output, None)] for found, output in zip(beams, outputs)]

    def generate_stream(self, prompts: list[list[int]],
                        sampling: SamplingConfig) -> Iterator[list[tuple[int, int]]]:
        """A static batch (at most max_batch_size prompts), all with `sampling`: yields,
        after each step, the (prompt index, token) pairs it produced; a sequence stops at
        `sampling.end_id` (not yielded) or after max_new_tokens."""
        self.check_request(prompts, sampling.max_new_tokens, sampling.num_beams)
        for step in self.stream_requests(prompts, [sampling] * len(prompts)):
            yield step.tokens

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
        """Generated ids of each prompt of a static batch (prompt and end token excluded)."""
        outputs: list[list[int]] = [[] for _ in prompts]
        for step in self.generate_stream(prompts, sampling):
            for index, token in step:
                outputs[index].append(token)
        return outputs
