"""In-flight batching's planner: a first-come-first-served request queue over the
KV cache's blocks. Each step admits waiting requests while the pool's blocks, the
batch limit and the step's token budget allow and plans one packed forward of every
running sequence's new tokens (whole prompts of admitted requests, one token of the
others; with chunked prefill, prompts in chunks that keep the step within its token
budget, so that running sequences keep decoding while a long prompt is read); once
the model runner has run it, postprocess chooses each sequence's token and retires
finished sequences, whose blocks are free for the next step.
When a running sequence needs a block and none is free, the newest running sequence
is preempted: its blocks are freed and it goes back to the head of the queue with
its tokens so far, to be recomputed. Pure: it holds the block manager and the
sequences, never the network."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from glm_engine import GlmEngineError
from glm_engine.runtime.beam_search import BeamGroup
from glm_engine.runtime.block_manager import BlockManager
from glm_engine.runtime.penalties import TokenHistory, apply_penalties, forbid_end
from glm_engine.runtime.sampling import SamplingConfig, nucleus_logits, sample_rows
from glm_engine.runtime.stop_words import StopStrings

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
    penalty_slot: int | None = None  # its row of the TokenHistory, while penalized and running
    stop: StopStrings | None = None  # its stop strings, when it has some
    reported: int = 0  # output tokens returned so far (stop strings hold some back)
    log_probs: list[float] = field(default_factory=list)  # of its output tokens, when asked
    group: BeamGroup | None = None  # its beam request, when it is one of its beams

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


class Scheduler:
    """Plans steps of at most `max_in_flight` sequences over the blocks of `block_manager`;
    knows nothing of the network that runs them."""

    def __init__(self, block_manager: BlockManager, max_in_flight: int,
                 tokens_per_step: int | None = None, chunked_prefill: bool = False) -> None:
        """`tokens_per_step`: the prompt tokens admitted per step (a longer prompt runs
        alone), or with `chunked_prefill` the step's whole budget, decode tokens included:
        prompts are read in chunks that fill what the decoding sequences leave."""
        for name, value in (("--max_in_flight", max_in_flight), ("--max_tokens_per_step", tokens_per_step)):
            if value is not None and value < 1:
                raise GlmEngineError(f"{name} must be at least 1, got {value}")
        self.block_manager = block_manager
        self.max_in_flight = max_in_flight
        self.tokens_per_step = tokens_per_step or DEFAULT_TOKENS_PER_STEP
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[list[Sequence]] = deque()  # a request's sequences: one, or its beams
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.history: TokenHistory | None = None  # made on the first penalized step, on the logits' device

    def fits(self, tokens: int, copies: int = 1) -> bool:
        """Whether `copies` sequences of `tokens` tokens can ever hold their blocks."""
        return copies * self.block_manager.blocks_for(tokens) <= self.block_manager.num_blocks

    def add(self, sequence: Sequence) -> None:
        """Queues a request (checked to fit the pool by the caller)."""
        if sequence.group is not None:
            sequence.group.sequences = [sequence]
        self.waiting.append([sequence])

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
            tokens = sum(sequence.length for sequence in unit)
            if self.chunked_prefill and group is None:
                if budget < 1:
                    break
                tokens = min(tokens, budget)  # its first chunk
            elif tokens > budget and budget < self.tokens_per_step:
                break  # a long prompt waits for a step of its own
            # Room for the prompt and the first generated token, so it is not preempted at once.
            if sum(manager.blocks_for(sequence.length + 1) for sequence in unit) > manager.free_blocks:
                break
            for sequence in unit:
                manager.grow(sequence.block_table, sequence.length)
            self.running += self.waiting.popleft()
            budget -= tokens

    def _retire(self, sequence: Sequence) -> None:
        """Frees a sequence's blocks and penalty slot (it finished, was preempted or dropped)."""
        self.block_manager.release(sequence.block_table)
        if sequence.penalty_slot is not None:
            self.history.give_back(sequence.penalty_slot)
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
        """The next step: admits first, then every running sequence's uncached tokens."""
        self._admit()
        copies = self._reserve_decode_slots()
        if not self.running:
            raise GlmEngineError("no request fits the KV cache pool")  # callers check fits() first
        new_tokens = self._chunks() if self.chunked_prefill else [sequence.uncached_tokens()
                                                                    for sequence in self.running]
        return StepPlan(list(self.running), new_tokens, copies)

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

    def postprocess(self, plan: StepPlan, logits: torch.Tensor, greedy: torch.Tensor) -> StepResult:
        """Chooses each sequence's next token from the step's float32 logits [B, vocab] and
        `greedy` argmax (_choose), records it and retires the finished sequences, whose
        blocks are free at once. `plan` is the running list schedule() returned. One pass
        over the sequences: at hundreds in flight this bookkeeping is part of every step."""
        # Rows whose step read a chunk of their prompt (only chunked steps cut prompts).
        reading = [sequence.cached + len(fed) < sequence.length for sequence, fed in
                   zip(plan.sequences, plan.new_tokens)] if self.chunked_prefill else [False] * len(plan.sequences)
        chosen, log_probs = self._choose(plan, logits, greedy, reading)
        result = StepResult([], [], len(plan.sequences), sum(map(len, plan.new_tokens)))
        still_running: list[Sequence | BeamGroup] = []
        for row, (sequence, fed) in enumerate(zip(plan.sequences, plan.new_tokens, strict=True)):
            sequence.cached += len(fed)
            if reading[row]:  # a chunk of its prompt: no token yet
                still_running.append(sequence)
                continue
            if sequence.group is not None:  # beams advance together, below
                if sequence is sequence.group.sequences[0]:
                    still_running.append(sequence.group)
                continue
            sampling = sequence.sampling
            token = chosen[row]
            done = token == sampling.end_id
            if not done:
                sequence.output.append(token)
                if sampling.output_log_probs:
                    sequence.log_probs.append(log_probs[row])
                done = len(sequence.output) >= sampling.max_new_tokens
            done = self._report(sequence, done, result)
            if done:
                self._retire(sequence)
                result.finished.append(sequence.index)
            else:
                still_running.append(sequence)
        self.running = []
        for entry in still_running:
            if isinstance(entry, BeamGroup):
                self._advance_beams(entry, plan, logits, result)
                entry = entry.sequences
            self.running += entry if isinstance(entry, list) else [entry]
        return result

    def _advance_beams(self, group: BeamGroup, plan: StepPlan, logits: torch.Tensor, result: StepResult) -> None:
        """One beam-search step of a beam request from its rows' logits: its running beams
        become the continuations chosen, each a table sharing its parent's blocks; once the
        search is done, its blocks are freed and its best beams reported."""
        rows = [row for row, sequence in enumerate(plan.sequences) if sequence.group is group]
        parents = group.search.step(logits[torch.tensor(rows, device=logits.device)].log_softmax(dim=-1))
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

    def _choose(self, plan: StepPlan, logits: torch.Tensor, greedy: torch.Tensor,
                reading: list[bool]) -> tuple[list[int], list[float] | None]:
        """Each row's token, and its log-probability when any row asks for them, each kind
        of row all at once: plain greedy rows keep `greedy`; rows with penalties, bad words
        or a minimum length get their logits adjusted (then the argmax when greedy);
        sampled rows are drawn from their requests' seeds (runtime/sampling.py). Rows still
        `reading` their prompts keep `greedy`, unused."""
        sequences = plan.sequences
        adjusted = [row for row, sequence in enumerate(sequences)
                    if sequence.sampling.changes_logits and not reading[row]]
        if adjusted:
            logits, greedy = self._adjust(sequences, logits, greedy, adjusted)
        sampled = [row for row, sequence in enumerate(sequences) if not sequence.sampling.greedy and not reading[row]]
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            rows = [sequences[row] for row in sampled]
            samplings = [sequence.sampling for sequence in rows]
            tokens = sample_rows(logits[index], samplings, [sequence.seed for sequence in rows],
                                 [len(sequence.output) for sequence in rows])
            greedy = greedy.index_copy(0, index, tokens.to(greedy.dtype))
        wants_log_probs = any(sequence.sampling.output_log_probs for sequence in sequences)
        if wants_log_probs and sampled:  # the distributions the tokens came from
            logits = logits.index_copy(0, index, nucleus_logits(logits[index], samplings))
        log_probs = logits.log_softmax(dim=-1).gather(1, greedy[:, None])[:, 0].tolist() if wants_log_probs else None
        chosen = greedy.tolist()  # one device-to-host copy for the whole step
        if adjusted:
            device = logits.device
            self.history.record(torch.tensor([sequences[row].penalty_slot for row in adjusted], device=device),
                                torch.tensor([chosen[row] for row in adjusted], device=device))
        return chosen, log_probs

    def _adjust(self, sequences: list[Sequence], logits: torch.Tensor, greedy: torch.Tensor,
                rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's logits and argmax with the given rows' penalties, bad words and minimum
        lengths applied (runtime/penalties.py), in a few batched ops."""
        if self.history is None:
            self.history = TokenHistory(self.max_in_flight, logits.shape[1], logits.device)
        chosen = [sequences[row] for row in rows]
        for sequence in chosen:
            if sequence.penalty_slot is None:
                sequence.penalty_slot = self.history.take(sequence.prompt, sequence.output)
        device = logits.device
        as_tensor = lambda values, dtype=torch.float32: torch.tensor(values, dtype=dtype, device=device)  # noqa: E731
        samplings = [sequence.sampling for sequence in chosen]
        index = as_tensor(rows, torch.long)
        adjusted = apply_penalties(logits[index], self.history,
                                   as_tensor([sequence.penalty_slot for sequence in chosen], torch.long),
                                   as_tensor([s.repetition_penalty for s in samplings]),
                                   as_tensor([s.presence_penalty for s in samplings]),
                                   as_tensor([s.frequency_penalty for s in samplings]))
        banned = [(i, word[-1]) for i, sequence in enumerate(chosen) for word in sequence.sampling.bad_words
                  if sequence.ends_with(word[:-1])]
        if banned:
            adjusted[as_tensor([i for i, _ in banned], torch.long), as_tensor([t for _, t in banned], torch.long)] = \
                float("-inf")
        too_short = [i for i, sequence in enumerate(chosen)
                     if len(sequence.output) < sequence.sampling.min_length and sequence.sampling.end_id >= 0]
        adjusted = forbid_end(adjusted, too_short, [chosen[i].sampling.end_id for i in too_short])
        return logits.index_copy(0, index, adjusted), greedy.index_copy(0, index, adjusted.argmax(dim=-1))

    def abort(self, index: int) -> None:
        """Drops request `index` wherever it is (queued, or running with all its beams):
        its blocks and penalty slot are free at once and it reports nothing more."""
        self.waiting = deque(unit for unit in self.waiting if unit[0].index != index)
        for sequence in [sequence for sequence in self.running if sequence.index == index]:
            self.running.remove(sequence)
            self._retire(sequence)

    def release_all(self) -> None:
        """Frees the blocks of every running sequence (a consumer that stops early)."""
        for sequence in self.running:
            self._retire(sequence)
