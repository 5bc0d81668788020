"""In-flight batching's planner: a first-come-first-served request queue over the
KV cache's blocks. Each step admits waiting requests while the pool's blocks, the
batch limit and the step's token budget allow and plans one packed forward of every
running sequence's new tokens (whole prompts of admitted requests, one token of the
others; with chunked prefill, prompts in chunks that keep the step within its token
budget, so that running sequences keep decoding while a long prompt is read); once
the model runner has run it and the sampler (runtime/sampler.py) has chosen each
row's token, postprocess records the tokens, applies the end token, length limit and
stop strings, advances beam requests and retires finished sequences, whose blocks are
free for the next step.
When a running sequence needs a block and none is free, the newest running sequence
is preempted: its blocks are freed and it goes back to the head of the queue with
its tokens so far, to be recomputed. With speculative decoding, decoding sequences
also feed their drafter's guesses (runtime/drafting.py), and postprocess keeps the
accepted ones (runtime/verification.py chose them). Pure bookkeeping in plain Python: it holds the
block manager and the sequences, never a tensor, and does not import torch."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from glm_engine import GlmEngineError
from glm_engine.runtime.block_manager import BlockManager
from glm_engine.runtime.drafting import DRAFTING_BATCH, DraftState, Drafter, SpeculativeConfig

if TYPE_CHECKING:  # types only: beam_search and sampling import torch
    from glm_engine.runtime.beam_search import BeamGroup
    from glm_engine.runtime.sampling import SamplingConfig
    from glm_engine.text.stop_words import StopStrings

DEFAULT_TOKENS_PER_STEP = 16384  # prompt tokens admitted per step (a longer prompt still runs alone); 8192 measured 25% slower


@dataclass
class Sequence:
    """One request while it is queued or running."""

    index: int  # the request's position in submission order
    prompt: list[int]
    sampling: SamplingConfig
    seed: int  # of its sampling noise (runtime/sampling.py), in [0, 2**64)
    output: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V are in the cache
    penalty_slot: int | None = None  # its row of the sampler's TokenHistory, while penalized and running
    stop: StopStrings | None = None  # its stop strings, when it has some
    reported: int = 0  # output tokens returned so far (stop strings hold some back)
    log_probs: list[float] = field(default_factory=list)  # of its output tokens, when asked
    group: BeamGroup | None = None  # its beam request, when it is one of its beams
    block_contents: list[int] = field(default_factory=list)  # content ids of its leading full blocks (prefix caching)
    grammar: Any = None  # its structured-output matcher (runtime/structured_output.py), when constrained
    drafting: DraftState | None = None  # its speculative drafting, once it has drafted

    @property
    def draftable(self) -> bool:
        """Whether speculative decoding may verify drafts of its tokens: a plain greedy or
        sampled request (penalties, logit bias, bad words, a minimum length, a grammar or
        beams choose each token from the ones before: those decode one at a time) whose
        acceptance so far is worth it."""
        sampling = self.sampling
        plain = self.group is None and self.grammar is None and not sampling.changes_logits
        return plain and (self.drafting is None or self.drafting.keeps_drafting)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    def ends_with(self, tokens: tuple[int, ...]) -> bool:
        """Whether the prompt and output so far end with `tokens` (without copying them)."""
        if not tokens:
            return True
        if len(tokens) > self.length:
            return False
        tail = self.output[-len(tokens):]
        if len(tail) < len(tokens):
            tail = self.prompt[len(tail) - len(tokens):] + tail
        return tuple(tail) == tuple(tokens)

    def uncached_tokens(self) -> list[int]:
        """The tokens whose K/V are not in the cache yet (without copying the prompt in decode)."""
        if self.cached >= len(self.prompt):
            return self.output[self.cached - len(self.prompt):]
        return self.tokens[self.cached:]


@dataclass
class StepPlan:
    """The sequences of one forward step and the tokens each feeds it."""

    sequences: list[Sequence]
    new_tokens: list[list[int]]
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (source, copy) before the forward
    reading: list[bool] = field(default_factory=list)  # rows whose step reads a chunk of their prompt: no token yet
    drafts: list[list[int]] = field(default_factory=list)  # each row's draft tokens (fed after its last token)

    def __post_init__(self) -> None:
        if not self.reading:
            self.reading = [False] * len(self.sequences)
        if not self.drafts:
            self.drafts = [[] for _ in self.sequences]

    @property
    def logit_counts(self) -> list[int] | None:
        """Each row's logits wanted from the forward (its draft's tokens and one more), when
        any row has a draft; None when each row wants its last token's only."""
        if not any(self.drafts):
            return None
        return [len(draft) + 1 for draft in self.drafts]

    @property
    def block_tables(self) -> list[list[int]]:
        return [sequence.block_table for sequence in self.sequences]

    @property
    def cached(self) -> list[int]:
        return [sequence.cached for sequence in self.sequences]


@dataclass
class StepResult:
    tokens: list[tuple[int, int]]  # (request index, new token); end tokens are not reported
    finished: list[int]  # request indices that finished in this step
    sequences: int = 0  # sequences in the step's forward
    forwarded_tokens: int = 0  # tokens in the step's forward (prompt tokens included)
    log_probs: list[tuple[int, float]] = field(default_factory=list)  # (request index, log-prob), when asked
    beams: list[tuple[int, list[tuple[list[int], float]]]] = field(default_factory=list)  # finished beam requests


@dataclass
class SampledTokens:
    """One step's choices, on the host, row for row of its plan (the sampler's result)."""

    tokens: list[int]  # rows still reading a prompt and beam rows hold their argmax, unused
    log_probs: list[float] | None = None  # of each row's token, when any row asks
    beam_parents: dict[BeamGroup, list[int]] = field(default_factory=dict)  # per beam request: each new beam's parent
    verified: dict[int, list[int]] = field(default_factory=dict)  # drafted rows: accepted draft tokens and one more
    verified_log_probs: dict[int, list[float]] = field(default_factory=dict)  # their log-probs, when asked


class TokenSampler(Protocol):
    """What chooses a scheduler's tokens: runtime/sampler.py's Sampler, named here by
    what Session.step and the scheduler call, so that this module needs no torch."""

    def sample(self, plan: StepPlan, logits: Any, greedy: Any) -> SampledTokens:
        """Each row's token of a step from its logits and argmax (device tensors)."""

    def give_back(self, slot: int) -> None:
        """Frees a retired sequence's penalty slot."""


class Scheduler:
    """Plans steps of at most `max_in_flight` sequences over the blocks of `block_manager`;
    knows nothing of the network that runs them. `sampler` chooses the tokens of its
    steps (Session.step runs it); the scheduler only gives it back retired sequences'
    penalty slots."""

    def __init__(self, block_manager: BlockManager, max_in_flight: int,
                 tokens_per_step: int | None = None, chunked_prefill: bool = False,
                 sampler: TokenSampler | None = None, speculative: SpeculativeConfig | None = None,
                 drafter: Drafter | None = None) -> None:
        """`tokens_per_step`: the prompt tokens admitted per step (a longer prompt runs
        alone), or with `chunked_prefill` the step's whole budget, decode tokens included:
        prompts are read in chunks that fill what the decoding sequences leave. With
        `speculative` and its `drafter`, decoding sequences feed drafts of their next
        tokens for the step to verify (runtime/drafting.py)."""
        for name, value in (("--max_in_flight", max_in_flight), ("--max_tokens_per_step", tokens_per_step)):
            if value is not None and value < 1:
                raise GlmEngineError(f"{name} must be at least 1, got {value}")
        self.block_manager = block_manager
        self.max_in_flight = max_in_flight
        self.tokens_per_step = tokens_per_step or DEFAULT_TOKENS_PER_STEP
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[list[Sequence]] = deque()  # a request's sequences: one, or its beams
        self.running: list[Sequence] = []
        self.requests: set[int] = set()  # the indices of queued and running requests
        self.preemptions = 0
        self.sampler = sampler
        self.speculative, self.drafter = speculative, drafter
        # Speculative decoding's counts (benchmark.py and serve.py report them).
        self.drafted_tokens = self.accepted_tokens = self.verify_steps = self.forward_steps = self.generated_tokens = 0

    def fits(self, tokens: int, copies: int = 1) -> bool:
        """Whether `copies` sequences of `tokens` tokens can ever hold their blocks."""
        return copies * self.block_manager.blocks_for(tokens) <= self.block_manager.num_blocks

    def add(self, sequence: Sequence) -> None:
        """Queues a request (checked to fit the pool by the caller)."""
        if sequence.group is not None:
            sequence.group.sequences = [sequence]
        self.waiting.append([sequence])
        self.requests.add(sequence.index)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        """Moves queued requests to running, in order, while blocks, slots and the token budget
        allow (a beam request takes num_beams slots from the start)."""
        manager = self.block_manager
        budget = self.tokens_per_step
        if self.chunked_prefill:  # what the running sequences read this step comes first
            budget -= sum(len(sequence.uncached_tokens()) for sequence in self.running)
        while self.waiting:
            unit = self.waiting[0]
            group = unit[0].group
            if len(self.running) + (group.search.num_beams if group else 1) > self.max_in_flight:
                break
            cached, content_ids = self._cached_prefix(unit)
            tokens = sum(sequence.length for sequence in unit) - len(cached) * manager.block_size  # to compute
            if self.chunked_prefill and group is None:
                if budget < 1:
                    break
                tokens = min(tokens, budget)  # its first chunk
            elif tokens > budget and budget < self.tokens_per_step:
                break  # a long prompt waits for a step of its own
            # Room for the prompt and the first generated token, so it is not preempted at once.
            needed = sum(manager.blocks_for(sequence.length + 1) for sequence in unit) - len(cached)
            if needed + manager.taken_from_free(cached) > manager.free_blocks:
                break
            if manager.prefix_caching and group is None:
                self._take_cached_prefix(unit[0], cached, content_ids)
            for sequence in unit:
                manager.grow(sequence.block_table, sequence.length)
            self.running += self.waiting.popleft()
            budget -= tokens

    def _cached_prefix(self, unit: list[Sequence]) -> tuple[list[int], list[int]]:
        """(blocks, content ids) a queued request would start from: with prefix caching, the
        full blocks of its tokens found in the cache, all but the one its last token falls
        in (that token is computed, for its logits, and no shared block is written).
        Beam requests compute their prompt."""
        sequence, manager = unit[0], self.block_manager
        if not manager.prefix_caching or sequence.group is not None:
            return [], []
        return manager.cached_prefix(sequence.tokens, (sequence.length - 1) // manager.block_size)

    def _take_cached_prefix(self, sequence: Sequence, blocks: list[int], content_ids: list[int]) -> None:
        """Starts an admitted sequence's table with its cached prefix, counted as computed."""
        manager = self.block_manager
        manager.take_cached(sequence.block_table, blocks)
        sequence.block_contents = content_ids
        sequence.cached = len(blocks) * manager.block_size
        manager.queried_tokens += sequence.length
        manager.hit_tokens += sequence.cached

    def _register_full_blocks(self, sequence: Sequence) -> None:
        """With prefix caching, registers the sequence's blocks that its computed tokens have
        filled since the last step, so that later requests can start from them."""
        manager, size = self.block_manager, self.block_manager.block_size
        contents = sequence.block_contents
        while len(contents) < sequence.cached // size:
            start, prompt_length = len(contents) * size, len(sequence.prompt)
            tokens = sequence.prompt[start:start + size]
            if len(tokens) < size:
                tokens += sequence.output[max(0, start - prompt_length):start + size - prompt_length]
            contents.append(manager.register(sequence.block_table[len(contents)], contents[-1] if contents else 0,
                                             tokens))

    def _retire(self, sequence: Sequence) -> None:
        """Frees a sequence's blocks and penalty slot (it finished, was preempted or dropped)."""
        self.block_manager.release(sequence.block_table)
        if sequence.drafting is not None:
            self.drafter.release(sequence.drafting)
        if sequence.penalty_slot is not None:
            self.sampler.give_back(sequence.penalty_slot)
            sequence.penalty_slot = None

    def _preempt_newest(self) -> Sequence:
        """Sends the newest running request (all its beams) back to the head of the queue,
        its blocks freed; its tokens are recomputed when it is admitted again."""
        victims = [self.running.pop()]
        group = victims[0].group
        while group is not None and self.running and self.running[-1].group is group:
            victims.insert(0, self.running.pop())
        for victim in victims:
            self._retire(victim)
            victim.cached = 0
            victim.block_contents = []
        self.waiting.appendleft(victims)
        self.preemptions += 1
        return victims[-1]

    def _reserve_decode_slots(self) -> list[tuple[int, int]]:
        """Gives each decoding sequence a slot for its next token, preempting the newest when
        short; a beam whose slot lies in a block other beams share gets its own copy first.
        Returns the block copies to make."""
        copies = []
        index = 0
        while index < len(self.running):
            sequence = self.running[index]
            if not self.block_manager.grow(sequence.block_table, sequence.length):
                if self._preempt_newest() is sequence:
                    break  # it was the newest: everything before it has its slot
                continue
            position = sequence.length - 1
            if sequence.group is not None and self.block_manager.is_shared(sequence.block_table, position):
                if self.block_manager.free_blocks == 0:
                    if self._preempt_newest() is sequence:
                        break
                    continue
                copies.append(self.block_manager.copy_on_write(sequence.block_table, position))
            index += 1
        return copies

    def schedule(self) -> StepPlan:
        """The next step: admits first, then every running sequence's uncached tokens (and
        the drafts of decoding ones, with speculative decoding)."""
        self._admit()
        self.forward_steps += 1
        copies = self._reserve_decode_slots()
        if not self.running:
            raise GlmEngineError("no request fits the KV cache pool")  # callers check fits() first
        if not self.chunked_prefill:
            plan = StepPlan(list(self.running), [sequence.uncached_tokens() for sequence in self.running], copies)
        else:
            new_tokens = self._chunks()  # only chunked steps cut prompts
            reading = [sequence.cached + len(fed) < sequence.length for sequence, fed in zip(self.running, new_tokens)]
            plan = StepPlan(list(self.running), new_tokens, copies, reading)
        if self.drafter is not None and len(plan.sequences) <= DRAFTING_BATCH:
            self._draft(plan)
        return plan

    def _draft(self, plan: StepPlan) -> None:
        """Adds drafts to the plan's decoding rows that may have them: each as long as its
        request's length limit and the pool's free blocks allow (a draft never preempts)."""
        rows = [row for row, (sequence, fed) in enumerate(zip(plan.sequences, plan.new_tokens))
                if len(fed) == 1 and not plan.reading[row] and sequence.draftable]
        room = [min(self.speculative.max_draft_len,
                    plan.sequences[row].sampling.max_new_tokens - len(plan.sequences[row].output) - 1) for row in rows]
        rows, room = [row for row, length in zip(rows, room) if length > 0], [length for length in room if length > 0]
        if not rows:
            return
        sequences = [plan.sequences[row] for row in rows]
        for sequence in sequences:
            sequence.drafting = sequence.drafting or DraftState()
        drafts = self.drafter.propose([sequence.tokens for sequence in sequences],
                                      [sequence.drafting for sequence in sequences], room)
        manager = self.block_manager
        for row, sequence, draft in zip(rows, sequences, drafts):
            if draft and not manager.grow(sequence.block_table, sequence.length + len(draft)):
                draft = draft[:len(sequence.block_table) * manager.block_size - sequence.length]
            plan.drafts[row] = draft
            plan.new_tokens[row] = plan.new_tokens[row] + draft
        self.verify_steps += any(plan.drafts)

    def _chunks(self) -> list[list[int]]:
        """Each running sequence's tokens for a chunked step, in admission order: decoding
        ones their one token, prefilling ones what the budget has left (at least one token
        each, so none stalls; a beam request reads its prompt whole, its beams in step)."""
        uncached = [sequence.uncached_tokens() for sequence in self.running]
        budget = self.tokens_per_step - sum(len(tokens) for tokens in uncached if len(tokens) == 1)
        chunks = []
        for sequence, tokens in zip(self.running, uncached):
            if len(tokens) > 1 and sequence.group is None:
                tokens = tokens[:max(budget, 1)]
                budget -= len(tokens)
            chunks.append(tokens)
        return chunks

    def postprocess(self, plan: StepPlan, sampled: SampledTokens) -> StepResult:
        """Records each sequence's token chosen by the sampler, applies the end token, the
        length limit and stop strings, advances beam requests and retires the finished
        sequences, whose blocks are free at once. `plan` is the running list schedule()
        returned. One pass over the sequences: at hundreds in flight this bookkeeping is
        part of every step."""
        result = StepResult([], [], len(plan.sequences), sum(map(len, plan.new_tokens)))
        still_running: list[Sequence] = []  # a beam request's first beam stands for all its beams
        caching = self.block_manager.prefix_caching
        for row, (sequence, fed) in enumerate(zip(plan.sequences, plan.new_tokens, strict=True)):
            draft = plan.drafts[row]
            if not draft:
                sequence.cached += len(fed)
                if caching and sequence.group is None:
                    self._register_full_blocks(sequence)
            if plan.reading[row]:  # a chunk of its prompt: no token yet
                still_running.append(sequence)
                continue
            if sequence.group is not None:  # beams advance together, below
                if sequence is sequence.group.sequences[0]:
                    still_running.append(sequence)
                continue
            if draft:
                chosen, log_probs = sampled.verified[row], sampled.verified_log_probs.get(row)
                self._count_draft(sequence.drafting, len(draft), len(chosen) - 1)
            else:
                chosen, log_probs = [sampled.tokens[row]], [sampled.log_probs[row]] if sampled.log_probs else None
            done = self._record(sequence, chosen, log_probs)
            if draft:
                self._count_verified(sequence, len(chosen))
            done = self._report(sequence, done, result)
            if done:
                self._retire(sequence)
                result.finished.append(sequence.index)
                self.requests.discard(sequence.index)
                continue
            if draft:  # the blocks that only rejected tokens reached go back
                self.block_manager.shrink(sequence.block_table, sequence.length)
            still_running.append(sequence)
        self.running = []
        for sequence in still_running:
            group = sequence.group  # none while reading: a beam request reads its prompt whole
            if group is None:
                self.running.append(sequence)
                continue
            self._advance_beams(group, sampled.beam_parents[group], result)
            self.running += group.sequences
        return result

    def _record(self, sequence: Sequence, tokens: list[int], log_probs: list[float] | None) -> bool:
        """Appends a row's chosen tokens (one, or a verified draft's accepted tokens and one
        more) to its output, up to its end token, its length limit or its grammar's end;
        whether it is done."""
        sampling = sequence.sampling
        for index, token in enumerate(tokens):
            if token == sampling.end_id:
                return True
            sequence.output.append(token)
            self.generated_tokens += 1
            if sampling.output_log_probs:
                sequence.log_probs.append(log_probs[index])
            if len(sequence.output) >= sampling.max_new_tokens:
                return True
            if sequence.grammar is not None:  # a complete text ends the request, end token or not
                sequence.grammar.consume_token(token)
                if sequence.grammar.is_stopped():
                    return True
        return False

    def _count_draft(self, state: DraftState, drafted: int, accepted: int) -> None:
        state.drafted += drafted
        state.accepted += accepted
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted

    def _count_verified(self, sequence: Sequence, chosen: int) -> None:
        """After a verify step that chose `chosen` tokens (accepted drafts and one more) and
        recorded them: the K/V of the last token fed and of the accepted draft tokens count as
        cached, those of tokens a finished request did not record excepted (the rejected
        ones' slots are written over later); full blocks are registered for prefix caching
        before a finished request frees them."""
        sequence.cached = min(sequence.cached + chosen, sequence.length)
        if self.block_manager.prefix_caching:
            self._register_full_blocks(sequence)

    def _advance_beams(self, group: BeamGroup, parents: list[int], result: StepResult) -> None:
        """A beam request after its search's step (the sampler's): its running beams become
        the continuations chosen, each a table sharing its parent's blocks (`parents`: for
        each, the beam it continues); once the search is done, its blocks are freed and its
        best beams reported."""
        old = group.sequences
        if group.search.done:
            for sequence in old:
                self._retire(sequence)
            group.sequences = []
            index = old[0].index
            best = group.search.results(old[0].sampling.num_return_sequences)
            result.tokens += [(index, token) for token in best[0][0]]
            result.beams.append((index, best))
            result.finished.append(index)
            self.requests.discard(index)
            return
        tables = [self.block_manager.share(old[parent].block_table) for parent in parents]
        for sequence in old:
            self.block_manager.release(sequence.block_table)
        leader = old[0]
        group.sequences = [old[i] if i < len(old) else
                           Sequence(leader.index, leader.prompt, leader.sampling, leader.seed, group=group)
                           for i in range(len(parents))]
        for sequence, table, beam in zip(group.sequences, tables, group.search.beams):
            sequence.block_table, sequence.output, sequence.cached = table, list(beam.output), leader.cached

    @staticmethod
    def _report(sequence: Sequence, done: bool, result: StepResult) -> bool:
        """Adds the sequence's returnable new tokens (and log-probs) to `result`; with stop
        strings, those not held back, the output cut where one was found. Whether it is done."""
        count = len(sequence.output)
        if sequence.stop is not None:
            count, stopped = sequence.stop.visible(sequence.output, done)
            if stopped:
                del sequence.output[count:]
                done = True
        result.tokens += [(sequence.index, token) for token in sequence.output[sequence.reported:count]]
        if sequence.sampling.output_log_probs:
            result.log_probs += [(sequence.index, value) for value in sequence.log_probs[sequence.reported:count]]
        sequence.reported = count
        return done

    def speculative_counts(self) -> dict[str, float]:
        """Drafted and accepted tokens, verify steps, and forward steps per generated token
        (prompt steps included) so far."""
        return {"drafted_tokens": self.drafted_tokens, "accepted_tokens": self.accepted_tokens,
                "acceptance": self.accepted_tokens / max(1, self.drafted_tokens), "verify_steps": self.verify_steps,
                "forward_steps_per_token": self.forward_steps / max(1, self.generated_tokens)}

    def holds(self, index: int) -> bool:
        """Whether request `index` is queued or running."""
        return index in self.requests

    def abort(self, index: int) -> None:
        """Drops request `index` wherever it is (queued, or running with all its beams):
        its blocks and penalty slot are free at once and it reports nothing more."""
        self.requests.discard(index)
        self.waiting = deque(unit for unit in self.waiting if unit[0].index != index)
        for sequence in [sequence for sequence in self.running if sequence.index == index]:
            self.running.remove(sequence)
            self._retire(sequence)

    def release_all(self) -> None:
        """Frees the blocks of every running sequence (a consumer that stops early)."""
        for sequence in self.running:
            self._retire(sequence)
