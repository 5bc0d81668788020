"""The engine object: one loaded engine with its scheduler and sampler, run as requests.
It loads an engine, chooses its ops, has the caller's network builder build the
network (model.load_session hands in model.py's, which picks the engine's model family
from glm_engine/models), sizes the KV pool and makes the scheduler over it. add_request queues
a request (checked against the engine's limits: EngineLimits, which serve.py's HTTP
side checks with too), step runs one planned step of every queued and running
request (packed prefill and decode forwards, CUDA-graph decode steps), abort drops
one; stream and generate run a list of prompts to the end over them.
prompt_logits and decode_logits serve accuracy checks."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glm_engine import GlmEngineError
from glm_engine.config import BuildConfig, ModelConfig
from glm_engine.engine_format.engine import Engine, engine_configs, load_engine, weights_file_name
from glm_engine.engine_format.kernel_cache import seed_triton_cache
from glm_engine.runtime.ops import Ops, select_ops
from glm_engine.quantization import dequantize_weights
from glm_engine.runtime.beam_search import BeamGroup, BeamSearch
from glm_engine.runtime.block_manager import BlockManager
from glm_engine.runtime.draft_model import DraftModel, check_draft_engine
from glm_engine.runtime.drafting import DRAFTING_BATCH, Drafter, PromptLookup, SpeculativeConfig
from glm_engine.runtime.distributed import Launch, TensorParallel, launch_from_environment, rank_device
from glm_engine.runtime.model_runner import ModelRunner
from glm_engine.runtime.kv_cache import pool_blocks, pop_kv_cache_scales
from glm_engine.runtime.memory import check_fits
from glm_engine.runtime.sampler import Sampler
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.runtime.scheduler import Scheduler, Sequence, StepResult
from glm_engine.runtime.structured_output import GrammarTokenizer, response_format_grammar
from glm_engine.text.stop_words import StopStrings
from glm_engine.engine_format.tensor_parallel import rank_model_config
from glm_engine.text.tokenizer import ChatGLMTokenizer, has_tokenizer, load_tokenizer

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


def resolve_speculative(speculative: SpeculativeConfig | None, build: BuildConfig) -> SpeculativeConfig | None:
    """A session's speculative decoding, its draft length resolved against the engine's
    --max_draft_len (and checked against it)."""
    if speculative is None:
        return None
    if not build.max_draft_len:
        raise GlmEngineError("speculative decoding needs an engine built with --max_draft_len K (the most draft "
                             "tokens a verify step takes); rebuild with it")
    if speculative.max_draft_len is None:
        speculative = dataclasses.replace(speculative, max_draft_len=build.max_draft_len)
    if speculative.max_draft_len > build.max_draft_len:
        raise GlmEngineError(f"--max_draft_len {speculative.max_draft_len} exceeds the engine's "
                             f"{build.max_draft_len}; ask for fewer or rebuild with a larger --max_draft_len")
    if speculative.mode == "draft_model" and build.world_size > 1:
        raise GlmEngineError("--speculative_decoding_mode draft_model runs on one GPU; use prompt_lookup with "
                             "tensor parallelism")
    return speculative


def check_weights_fit(engine_dir: Path, rank: int) -> None:
    """Raises GlmEngineError when host memory cannot hold the rank's weights file, which
    loading reads into memory of its own (on the way to a GPU too)."""
    path = engine_dir / weights_file_name(rank)
    if path.is_file():  # a missing file is the loader's to name
        check_fits(f"loading {path}", path.stat().st_size, torch.device("cpu"),
                   "free host memory, or load the engine on a host with more")


@dataclass(frozen=True)
class EngineLimits:
    """What a request is checked against: the engine's build limits, vocabulary, KV pool
    and sequences in flight (and its end token, which requests stop at). Plain data:
    serve.py's HTTP side holds the copy its engine process sent and refuses a request
    with the same checks before sending it."""

    build_config: BuildConfig
    vocab_size: int
    end_id: int
    num_blocks: int
    block_size: int
    max_in_flight: int
    pool_flags: str  # the flags that size the KV pool on the engine's device
    more_end_ids: tuple[int, ...] = ()  # the model's other end ids (GLM-4's), requests' stop tokens unless beams
    speculative: bool = False  # the engine decodes speculatively: beams are refused

    def check_prompt(self, prompt: list[int], max_new_tokens: int, index: int = 0) -> None:
        """Raises GlmEngineError when request `index`'s prompt or length breaks the engine's limits."""
        build = self.build_config
        if max_new_tokens > build.max_output_len:
            raise GlmEngineError(f"max_output_len {max_new_tokens} exceeds the engine's max_output_len "
                                 f"{build.max_output_len}; ask for fewer tokens or rebuild")
        if not prompt:
            raise GlmEngineError(f"prompt {index} is empty")
        if len(prompt) > build.max_input_len:
            raise GlmEngineError(f"prompt {index} has {len(prompt)} tokens, over the engine's "
                                 f"max_input_len {build.max_input_len}; shorten it or rebuild")
        bad = [token for token in prompt if not 0 <= token < self.vocab_size]
        if bad:
            raise GlmEngineError(f"prompt {index} holds token id {bad[0]}, outside the vocabulary "
                                 f"[0, {self.vocab_size})")

    def check(self, prompt: list[int], sampling: SamplingConfig, index: int = 0) -> None:
        """Raises GlmEngineError for request `index` when the engine or its KV pool can never hold it."""
        self.check_prompt(prompt, sampling.max_new_tokens, index)
        vocab = self.vocab_size
        if any(token >= vocab for word in sampling.bad_words for token in word):
            raise GlmEngineError(f"a bad word of request {index} holds a token id outside the vocabulary [0, {vocab})")
        beams = sampling.num_beams
        if beams > 1 and self.speculative:
            raise GlmEngineError(f"request {index}: beam search with speculative decoding is not built; use num_beams 1 "
                                 "or drop --speculative_decoding_mode")
        if beams > self.max_in_flight:
            raise GlmEngineError(f"request {index} asks for {beams} beams, more than the {self.max_in_flight} "
                                 "sequences in flight; use fewer beams or a larger --max_batch_size")
        # Beams recomputed after a preemption hold their prompts apart: the pool must hold them so.
        tokens = len(prompt) + sampling.max_new_tokens
        if beams * -(-tokens // self.block_size) > self.num_blocks:
            raise GlmEngineError(f"prompt {index} needs {beams} x {tokens} tokens of KV cache, more than the "
                                 f"pool's {self.num_blocks * self.block_size}; raise {self.pool_flags}")


@dataclass(frozen=True)
class EngineStats:
    """The engine's load: sequences running and waiting, free and total KV-pool blocks."""

    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    total_blocks: int = 0


@dataclass
class RequestOutput:
    """One request's result: its generated ids (end token excluded), each one's
    log-probability when the request asked (output_log_probs), and for a beam request its
    num_return_sequences best beams (ids, Hugging Face's score: cumulative log-probability
    / length ** length_penalty), best first; its ids are the best beam's."""

    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    beams: list[tuple[list[int], float]] = field(default_factory=list)

    @property
    def returned(self) -> list[list[int]]:
        """The ids it returns: each returned beam's, or its one output's."""
        return [ids for ids, _ in self.beams] or [self.token_ids]


def record_step(outputs: list[RequestOutput], step: StepResult) -> None:
    """Adds a step's tokens, log-probs and finished beams to `outputs` (indexed by request id)."""
    for request_id, token in step.tokens:
        outputs[request_id].token_ids.append(token)
    for request_id, log_prob in step.log_probs:
        outputs[request_id].log_probs.append(log_prob)
    for request_id, best in step.beams:
        outputs[request_id].beams = best


class Session:
    """One loaded engine and the requests it runs, in flight over one block-addressed KV
    cache: add_request, step, abort, and the loops stream and generate over them. At most
    max_batch_size sequences run at a time, on engines built with or without in-flight
    batching: the requests beyond them wait in the queue and start as others finish, each
    with the tokens it gets alone."""

    def __init__(self, engine: Engine | str | Path, build_network: NetworkBuilder,
                 device: str | torch.device | None = None, cuda_graphs: bool = True,
                 kv_cache_free_gpu_mem_fraction: float | None = None,
                 max_tokens_in_paged_kv_cache: int | None = None, tokenizer: ChatGLMTokenizer | None = None,
                 max_in_flight: int | None = None, tokens_per_step: int | None = None,
                 chunked_prefill: bool = False, prefix_caching: bool = False,
                 speculative: SpeculativeConfig | None = None) -> None:
        """`tokenizer` decodes text for stop strings (default: the engine's own, when it has
        one); the scheduler's options as configure_scheduler's; `prefix_caching`: requests
        reuse the cached K/V blocks of the prompt prefix they share with earlier ones
        (runtime/block_manager.py); `speculative`: decoding steps verify drafts of the next
        tokens (runtime/drafting.py; the engine built with --max_draft_len)."""
        launch = launch_from_environment()
        target, build = (engine.model_config, engine.build_config) if isinstance(engine, Engine) \
            else engine_configs(engine)
        check_launch(build.world_size, launch)  # on every rank, before any waits for the others
        self.speculative = resolve_speculative(speculative, build)  # refused before loading
        self.device = resolve_device(rank_device(launch, str(device) if device is not None else None))
        start = time.perf_counter()
        # The draft engine first: its small KV pool is sized before this engine's takes the rest.
        self.drafter = self._drafter(build_network, cuda_graphs, target, build)
        if not isinstance(engine, Engine):
            check_weights_fit(Path(engine), launch.rank)
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
        kv_cache_scales = pop_kv_cache_scales(weights, config.num_layers)
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
        self.block_manager = BlockManager(num_blocks, build.tokens_per_block, prefix_caching)
        built = time.perf_counter()
        verify_shapes = None
        if self.speculative is not None:
            verify_shapes = (min(DRAFTING_BATCH, build.max_batch_size), self.speculative.max_draft_len)
        self.runner = ModelRunner(network, ops, rank_config, build, self.device, num_blocks, cuda_graphs,
                                  kv_cache_scales, verify_shapes)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB%s)%s", num_blocks, build.tokens_per_block,
                    num_blocks * build.tokens_per_block, self.runner.kv_cache.nbytes / 2**30,
                    " on each rank" if build.world_size > 1 else "",
                    ", paged" if build.paged_kv_cache else ", a full sequence per batch row")
        # Unseeded requests draw their seeds from here: the same on every rank.
        self.seeds = random.Random(self.parallel.shared_seed())
        self._next_id = 0  # the id of the next request added without one
        self._grammar_tokenizer: GrammarTokenizer | None = None  # made for the first response_format
        self._new_scheduler(max_in_flight, tokens_per_step, chunked_prefill)
        # Seconds per start-up stage, for benchmark.py (a lazy CUDA-graph capture would hide in the first step).
        self.startup_seconds = {"load_engine": loaded - start, "build_model": built - loaded,
                                "capture_graphs": time.perf_counter() - built}

    def _drafter(self, build_network: NetworkBuilder, cuda_graphs: bool, target: ModelConfig,
                 build: BuildConfig) -> Drafter | None:
        """The drafter of the session's speculative decoding (None without): prompt lookup, or
        the draft engine loaded as a session of its own with a pool for its drafting sequences."""
        speculative = self.speculative
        if speculative is None:
            return None
        if speculative.mode == "prompt_lookup":
            return PromptLookup(speculative.max_ngram)
        draft_config, draft_build = engine_configs(speculative.draft_engine_dir)
        check_draft_engine(draft_config, draft_build, target, build)  # before loading it
        pool = {"max_tokens_in_paged_kv_cache": DRAFTING_BATCH * build.max_sequence_len} \
            if draft_build.paged_kv_cache else {}
        return DraftModel(Session(speculative.draft_engine_dir, build_network, self.device, cuda_graphs, **pool))

    @property
    def is_main_rank(self) -> bool:
        """Whether this process prints and writes files (rank 0, or the only one)."""
        return self.parallel.is_main

    def configure_scheduler(self, max_in_flight: int | None = None, tokens_per_step: int | None = None,
                            chunked_prefill: bool = False) -> None:
        """Schedules the coming requests with at most `max_in_flight` sequences per step
        (default and ceiling: max_batch_size) and `tokens_per_step` tokens (Scheduler's;
        with `chunked_prefill`, long prompts read in chunks within it). Refused while
        requests are queued or running."""
        if self.has_work:
            raise GlmEngineError("the scheduler's options change only while no request is queued or running")
        self._new_scheduler(max_in_flight, tokens_per_step, chunked_prefill)

    def _new_scheduler(self, max_in_flight: int | None, tokens_per_step: int | None, chunked_prefill: bool) -> None:
        """A scheduler (with the sampler that chooses its steps' tokens) over the KV pool, and
        the limits it puts on requests."""
        ceiling = self.build_config.max_batch_size
        max_in_flight = ceiling if max_in_flight is None else min(max_in_flight, ceiling)
        self.scheduler = Scheduler(self.block_manager, max_in_flight, tokens_per_step, chunked_prefill,
                                   Sampler(max_in_flight), self.speculative, self.drafter)
        self._scheduler_options = (max_in_flight, tokens_per_step, chunked_prefill)
        manager = self.block_manager
        flags = "--max_tokens_in_paged_kv_cache" if self.device.type != "cuda" else \
            "--kv_cache_free_gpu_mem_fraction or --max_tokens_in_paged_kv_cache"  # the CPU takes only the first
        self.limits = EngineLimits(self.build_config, self.model_config.vocab_size, self.model_config.eos_token_id,
                                   manager.num_blocks, manager.block_size, max_in_flight, flags,
                                   self.model_config.eos_token_ids[1:], self.speculative is not None)

    @property
    def has_work(self) -> bool:
        """Whether a request is queued or running."""
        return self.scheduler.has_work

    def stats(self) -> EngineStats:
        """Sequences running and waiting, and the KV pool's free and total blocks, now."""
        scheduler, manager = self.scheduler, self.block_manager
        return EngineStats(len(scheduler.running), sum(len(unit) for unit in scheduler.waiting), manager.free_blocks,
                           manager.num_blocks)

    def add_request(self, prompt: list[int], sampling: SamplingConfig, request_id: int | None = None) -> int:
        """Queues a request; returns its id: `request_id` (unique among the queued and
        running requests) or the next unused number. Refuses (GlmEngineError) one the
        engine or the KV pool can never hold (`limits`)."""
        if request_id is None:
            request_id = self._next_id
        elif self.scheduler.holds(request_id):  # its tokens and abort() would reach the other request
            raise GlmEngineError(f"request id {request_id} is already queued or running; give each live request "
                                 "its own id")
        self.limits.check(prompt, sampling, request_id)
        seed = self.seeds.getrandbits(63) if sampling.random_seed is None else sampling.random_seed
        group = None
        if sampling.num_beams > 1:
            group = BeamGroup(BeamSearch(sampling.num_beams, sampling.length_penalty, sampling.early_stopping,
                                         sampling.end_id, len(prompt), sampling.max_new_tokens))
        self.scheduler.add(Sequence(request_id, list(prompt), sampling, seed,
                                    stop=self._stop_strings(request_id, sampling), group=group,
                                    grammar=self._grammar(request_id, sampling)))
        self._next_id = max(self._next_id, request_id + 1)
        return request_id

    def _stop_strings(self, index: int, sampling: SamplingConfig) -> StopStrings | None:
        """The watcher of a request's stop strings, which are matched on decoded text."""
        if not sampling.stop_words:
            return None
        return StopStrings(sampling.stop_words, self._text_tokenizer(index, "stop words, which are matched on text"))

    def _grammar(self, index: int, sampling: SamplingConfig) -> Any:
        """The structured-output matcher of a request with a response_format (None without)."""
        grammar = response_format_grammar(sampling.response_format) if sampling.response_format else None
        if grammar is None:
            return None
        if self._grammar_tokenizer is None:
            tokenizer = self._text_tokenizer(index, "a response_format, whose grammar is over text")
            self._grammar_tokenizer = GrammarTokenizer(tokenizer, self.model_config.vocab_size)
        return self._grammar_tokenizer.matcher(grammar)

    def _text_tokenizer(self, index: int, needs: str) -> ChatGLMTokenizer:
        """The session's tokenizer, loaded from the engine on first need."""
        if self.tokenizer is None:
            if not has_tokenizer(self.engine_dir):
                raise GlmEngineError(f"request {index} has {needs}, and the engine has no tokenizer; pass one "
                                     "(run.py --tokenizer_dir)")
            self.tokenizer = load_tokenizer(self.engine_dir)
        return self.tokenizer

    @torch.inference_mode()
    def step(self) -> StepResult:
        """One planned step of the queued and running requests: the scheduler's plan, the
        runner's forward, the sampler's tokens, then the scheduler's bookkeeping (each
        sequence's token recorded, finished ones retired, their blocks free)."""
        scheduler = self.scheduler
        plan = scheduler.schedule()
        if plan.block_copies:  # beams about to write into blocks they shared
            self.runner.kv_cache.copy_blocks(plan.block_copies)
        logits, greedy = self.runner.execute(plan.block_tables, plan.cached, plan.new_tokens, plan.logit_counts)
        return scheduler.postprocess(plan, scheduler.sampler.sample(plan, logits, greedy))

    def abort(self, request_id: int) -> None:
        """Drops a queued or running request: its blocks are free at once and it reports nothing more."""
        self.scheduler.abort(request_id)

    def check_requests(self, prompts: list[list[int]], samplings: SamplingConfig | list[SamplingConfig]) -> None:
        """Raises GlmEngineError unless there are prompts and each request is within `limits`
        (more sequences than max_batch_size wait in the queue, on any engine)."""
        if not prompts:
            raise GlmEngineError("no prompts given")
        samplings = self._per_prompt(prompts, samplings)
        for index, (prompt, sampling) in enumerate(zip(prompts, samplings)):
            self.limits.check(prompt, sampling, index)

    @staticmethod
    def _per_prompt(prompts: list[list[int]], samplings: SamplingConfig | list[SamplingConfig]) -> list[SamplingConfig]:
        """One sampling per prompt: `samplings` itself, or the one given for all."""
        if isinstance(samplings, SamplingConfig):
            return [samplings] * len(prompts)
        if len(samplings) != len(prompts):
            raise GlmEngineError(f"{len(samplings)} samplings for {len(prompts)} prompts; give one per prompt")
        return list(samplings)

    def stream(self, prompts: list[list[int]],
               samplings: SamplingConfig | list[SamplingConfig]) -> Iterator[StepResult]:
        """Runs a request per prompt (request i for prompt i; `samplings`: one per prompt, or
        one for all) on an idle engine until all finish, yielding each step's result. A
        consumer that stops early leaves no request queued and no block taken."""
        samplings = self._per_prompt(prompts, samplings)
        if self.has_work:
            raise GlmEngineError("stream and generate run on an idle engine; finish or abort its requests first")
        self.check_requests(prompts, samplings)
        try:
            for index, (prompt, sampling) in enumerate(zip(prompts, samplings)):
                self.add_request(prompt, sampling, index)
            while self.has_work:
                yield self.step()
        finally:
            if self.has_work:  # stopped early, or a step failed: every request left is this stream's
                self.scheduler.release_all()
                self._new_scheduler(*self._scheduler_options)

    def generate(self, prompts: list[list[int]],
                 samplings: SamplingConfig | list[SamplingConfig]) -> list[RequestOutput]:
        """Each prompt's RequestOutput, in prompt order (stream's requests, run to the end)."""
        outputs = [RequestOutput() for _ in prompts]
        for step in self.stream(prompts, samplings):
            record_step(outputs, step)
        return outputs

    @torch.inference_mode()
    def prompt_logits(self, prompt: list[int]) -> torch.Tensor:
        """Float32 logits [len(prompt), vocab] at every position of one prompt."""
        self.limits.check_prompt(prompt, 1)
        with self._blocks_for(prompt) as block_table:
            return self.runner.prompt_logits(block_table, prompt)

    def decode_logits(self, prompt: list[int], decoded: int) -> torch.Tensor:
        """Float32 logits [decoded, vocab] at the last `decoded` positions of one prompt, each
        from a decode step (one new token; the decode graphs when captured) after a prefill
        of the tokens before them: generation's path, fed the prompt's tokens."""
        self.limits.check_prompt(prompt, 1)
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
        """A block table holding `prompt`'s K/V outside any request, released afterwards."""
        block_table: list[int] = []
        if not self.block_manager.grow(block_table, len(prompt)):
            raise GlmEngineError("the KV cache pool is too small for this prompt")
        try:
            yield block_table
        finally:
            self.block_manager.release(block_table)
