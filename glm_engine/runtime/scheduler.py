"""In-flight batching: a first-come-first-served request queue over the paged
KV cache. Each step admits waiting requests while the pool's blocks, the
batch limit and the step's token budget allow, runs one packed forward of
every running sequence's new tokens (whole prompts of admitted requests, one
token of the others), samples, and retires finished sequences, whose blocks
are free for the next step. When a running sequence needs a block and none is
free, the newest running sequence is preempted: its blocks are freed and it
goes back to the head of the queue with its tokens so far, to be recomputed.
Each request samples from its own seeded generator, so its tokens do not
depend on what it was batched with."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from glm_engine import GlmEngineError
from glm_engine.runtime.sampling import SamplingConfig, sample

if TYPE_CHECKING:
    from glm_engine.runtime.session import Session

DEFAULT_TOKENS_PER_STEP = 16384  # prompt tokens admitted per step (a longer prompt still runs alone); 8192 measured 25% slower


@dataclass
class Sequence:
    """One request while it is queued or running."""

    index: int  # the request's position in submission order
    prompt: list[int]
    sampling: SamplingConfig
    generator: torch.Generator
    output: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V are in the cache

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    def uncached_tokens(self) -> list[int]:
        """The tokens whose K/V are not in the cache yet (without copying the prompt in decode)."""
        if self.cached >= len(self.prompt):
            return self.output[self.cached - len(self.prompt):]
        return self.tokens[self.cached:]


@dataclass
class StepResult:
    tokens: list[tuple[int, int]]  # (request index, new token); end tokens are not reported
    finished: list[int]  # request indices that finished in this step
    sequences: int = 0  # sequences in the step's forward
    forwarded_tokens: int = 0  # tokens in the step's forward (prompt tokens included)


class Scheduler:
    """Runs requests on a session with at most `max_in_flight` sequences per step."""

    def __init__(self, session: Session, max_in_flight: int | None = None,
                 tokens_per_step: int | None = None) -> None:
        build = session.build_config
        for name, value in (("--max_in_flight", max_in_flight), ("--max_tokens_per_step", tokens_per_step)):
            if value is not None and value < 1:
                raise GlmEngineError(f"{name} must be at least 1, got {value}")
        self.session = session
        self.max_in_flight = min(max_in_flight or build.max_batch_size, build.max_batch_size)
        self.tokens_per_step = tokens_per_step or DEFAULT_TOKENS_PER_STEP
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, index: int, prompt: list[int], sampling: SamplingConfig) -> None:
        """Queues request `index`; refuses one the engine or the KV pool can never hold."""
        self.session.check_prompt(index, prompt, sampling.max_new_tokens)
        manager = self.session.block_manager
        if manager.blocks_for(len(prompt) + sampling.max_new_tokens) > manager.num_blocks:
            flags = "--max_tokens_in_paged_kv_cache" if self.session.device.type != "cuda" else \
                "--kv_cache_free_gpu_mem_fraction or --max_tokens_in_paged_kv_cache"  # the CPU takes only the first
            raise GlmEngineError(f"prompt {index} needs {len(prompt) + sampling.max_new_tokens} tokens of KV "
                                 f"cache, more than the pool's {manager.num_blocks * manager.block_size}; raise "
                                 f"{flags}")
        generator = torch.Generator(device=self.session.device)
        if sampling.random_seed is None:
            generator.seed()
        else:
            generator.manual_seed(sampling.random_seed)
        self.waiting.append(Sequence(index, list(prompt), sampling, generator))

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        """Moves queued requests to running, in order, while blocks, slots and the token budget allow."""
        manager = self.session.block_manager
        budget = self.tokens_per_step
        while self.waiting and len(self.running) < self.max_in_flight:
            sequence = self.waiting[0]
            tokens = sequence.length
            if tokens > budget and budget < self.tokens_per_step:
                break  # a long prompt waits for a step of its own
            # Room for the prompt and the first generated token, so it is not preempted at once.
            if manager.blocks_for(tokens + 1) > manager.free_blocks:
                break
            manager.grow(sequence.block_table, tokens)
            self.running.append(self.waiting.popleft())
            budget -= tokens

    def _preempt_newest(self) -> Sequence:
        victim = self.running.pop()
        self.session.block_manager.release(victim.block_table)
        victim.cached = 0
        self.waiting.appendleft(victim)
        self.preemptions += 1
        return victim

    def _reserve_decode_slots(self) -> None:
        """Gives each decoding sequence a slot for its next token, preempting the newest when short."""
        manager = self.session.block_manager
        index = 0
        while index < len(self.running):
            sequence = self.running[index]
            if manager.grow(sequence.block_table, sequence.length):
                index += 1
            elif self._preempt_newest() is sequence:
                break  # it was the newest: everything before it has its slot

    def step(self) -> StepResult:
        """One forward of every running sequence; admits first, retires after."""
        self._admit()
        self._reserve_decode_slots()
        if not self.running:
            raise GlmEngineError("no request fits the KV cache pool")  # add() rules this out
        running = self.running
        new_tokens = [sequence.uncached_tokens() for sequence in running]
        logits, greedy = self.session.run_step([sequence.block_table for sequence in running],
                                               [sequence.cached for sequence in running], new_tokens)
        greedy = greedy.tolist()  # one device-to-host copy for the whole step
        result = StepResult([], [], len(running), sum(map(len, new_tokens)))
        still_running = []
        for row, (sequence, tokens) in enumerate(zip(running, new_tokens)):
            sequence.cached += len(tokens)
            sampling = sequence.sampling
            if sampling.greedy:
                token = greedy[row]
            else:
                token = int(sample(logits[row:row + 1], sampling, sequence.generator)[0])
            done = token == sampling.end_id
            if not done:
                sequence.output.append(token)
                result.tokens.append((sequence.index, token))
                done = len(sequence.output) >= sampling.max_new_tokens
            if done:
                self.session.block_manager.release(sequence.block_table)
                result.finished.append(sequence.index)
            else:
                still_running.append(sequence)
        self.running = still_running
        return result
