"""Token choice beside the model runner: from one step's float32 logits [B, vocab] and
their argmax, every row's token chosen on the logits' device, each kind of row all at
once. Rows under a grammar (structured output) have the tokens it forbids masked
first. Plain greedy rows keep the argmax; rows with penalties, bad words, a minimum
length or a logit bias get their logits adjusted in a few batched ops
(runtime/penalties.py, whose TokenHistory the sampler owns) and, when greedy, the
adjusted argmax; sampled rows are drawn from their requests' seeds and output lengths
(runtime/sampling.py), past their min_p floor. When any row asks, each row's
log-probability under the distribution its token came from (the nucleus for sampled
rows), and the likeliest tokens of that distribution for rows asking top_log_probs. A
beam request's rows give their log-softmax to its BeamSearch, whose parents the
scheduler turns into block tables. The result, SampledTokens (runtime/scheduler.py),
is plain Python: the step's tokens and log-probs reach the host in one read (a
request's stop_token_ids given as its end token, which the scheduler ends it at);
beam search reads its candidates itself."""

from __future__ import annotations

from itertools import accumulate
from typing import TYPE_CHECKING

import torch

from glm_engine.runtime.penalties import TokenHistory, apply_penalties, forbid_end
from glm_engine.runtime.sampling import (log_prob_columns, min_p_logits, nucleus_logits, on_device, read_log_prob,
                                         sample_rows)
from glm_engine.runtime.scheduler import SampledTokens, Sequence, StepPlan
from glm_engine.runtime.structured_output import fill_masks, mask_logits
from glm_engine.runtime.verification import DraftedRow, verify

if TYPE_CHECKING:
    from glm_engine.runtime.beam_search import BeamGroup


class Sampler:
    """Chooses the tokens of one scheduler's steps; holds the penalty tables of up to
    `slots` penalized sequences (made on the first penalized step, on its device)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.history: TokenHistory | None = None

    def give_back(self, slot: int) -> None:
        """Frees a retired sequence's penalty slot."""
        self.history.give_back(slot)

    def sample(self, plan: StepPlan, logits: torch.Tensor, greedy: torch.Tensor) -> SampledTokens:
        """Each row's token of a step from its float32 `logits` [B, vocab] and `greedy`
        argmax [B], with log-probs when any row asks and each beam request's parents. In a
        speculative verify step (plan.logit_counts), the logits hold each row's last
        logit_counts[row] positions: drafted rows get their verified tokens
        (runtime/verification.py), the others their token from their one position."""
        counts = plan.logit_counts
        if counts is None:
            return self._sample(plan, logits, greedy)
        ends = list(accumulate(counts))
        rows = [row for row, draft in enumerate(plan.drafts) if draft]
        if len(rows) == len(counts):  # every row verified: no row's token comes from _sample (nor a read)
            sampled = SampledTokens([-1] * len(counts))
        else:
            last = on_device([end - 1 for end in ends], logits.device)
            sampled = self._sample(plan, logits[last], greedy[last])
        drafted = [DraftedRow(ends[row] - counts[row], plan.drafts[row], plan.sequences[row].sampling,
                              plan.sequences[row].seed, len(plan.sequences[row].output)) for row in rows]
        chosen, log_probs = verify(logits, greedy, drafted)
        for index, (row, tokens) in enumerate(zip(rows, chosen)):
            sampled.verified[row] = _stop_tokens_as_end([plan.sequences[row]] * len(tokens), tokens)
            if log_probs is not None:
                sampled.verified_log_probs[row] = log_probs[index]
        return sampled

    def _sample(self, plan: StepPlan, logits: torch.Tensor, greedy: torch.Tensor) -> SampledTokens:
        """sample() of one logits row per plan row."""
        sequences, reading = plan.sequences, plan.reading
        chosen_logits = logits
        # First: the grammar masks are made on the host while the GPU still runs the forward.
        constrained = [row for row, sequence in enumerate(sequences)
                       if sequence.grammar is not None and not reading[row]]
        if constrained:
            chosen_logits, greedy = self._constrain(sequences, chosen_logits, greedy, constrained)
        adjusted = [row for row, sequence in enumerate(sequences)
                    if sequence.sampling.changes_logits and not reading[row]]
        if adjusted:
            chosen_logits, greedy = self._adjust(sequences, chosen_logits, greedy, adjusted)
        wants_log_probs = any(sequence.sampling.output_log_probs for sequence in sequences)
        drawn = [row for row, sequence in enumerate(sequences) if not sequence.sampling.greedy and not reading[row]]
        if drawn:
            chosen_logits, greedy = self._draw(sequences, chosen_logits, greedy, drawn, wants_log_probs)
        if adjusted:  # on the device: the counts need no read of the tokens
            slots = on_device([sequences[row].penalty_slot for row in adjusted], logits.device)
            self.history.record(slots, greedy[on_device(adjusted, logits.device)].long())
        parents = self._beam_parents(plan, logits)
        if not wants_log_probs:
            return SampledTokens(_stop_tokens_as_end(sequences, greedy.tolist()), None, parents)  # the one read
        tokens, values = self._log_probs(sequences, chosen_logits, greedy)
        return SampledTokens(_stop_tokens_as_end(sequences, tokens), values, parents)

    @staticmethod
    def _log_probs(sequences: list[Sequence], logits: torch.Tensor,
                   greedy: torch.Tensor) -> tuple[list[int], list[float]]:
        """Each row's token and its log-probability under the distribution it came from; for
        rows asking top_log_probs, a LogProb with the likeliest tokens of that distribution.
        One read for all."""
        top = min(max(sequence.sampling.top_log_probs for sequence in sequences), logits.shape[1])
        rows = torch.cat([greedy.double()[:, None]] + log_prob_columns(logits, greedy, top), dim=1).tolist()
        tokens = [int(row[0]) for row in rows]
        return tokens, [read_log_prob(row[1:], sequence.sampling.top_log_probs, top)
                        for sequence, row in zip(sequences, rows)]

    @staticmethod
    def _constrain(sequences: list[Sequence], logits: torch.Tensor, greedy: torch.Tensor,
                   rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's logits and argmax with the given rows' tokens that their grammar does not
        allow at -inf (runtime/structured_output.py): greedy and sampled choices, penalties and
        log-probs all see the masked logits."""
        words = fill_masks([sequences[row].grammar for row in rows], logits.shape[1],
                           [sequences[row].sampling.end_id for row in rows])
        index = on_device(rows, logits.device)
        masked = mask_logits(logits[index], words)
        greedy = greedy.index_copy(0, index, masked.argmax(dim=-1).to(greedy.dtype))
        return logits.index_copy(0, index, masked), greedy

    def _adjust(self, sequences: list[Sequence], logits: torch.Tensor, greedy: torch.Tensor,
                rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's logits and argmax with the given rows' penalties, bad words and minimum
        lengths applied (runtime/penalties.py), in a few batched ops."""
        if self.history is None:
            self.history = TokenHistory(self.slots, logits.shape[1], logits.device)
        chosen = [sequences[row] for row in rows]
        for sequence in chosen:
            if sequence.penalty_slot is None:
                sequence.penalty_slot = self.history.take(sequence.prompt, sequence.output)
        device = logits.device
        as_tensor = lambda values, dtype=torch.float32: on_device(values, device, dtype)  # noqa: E731
        samplings = [sequence.sampling for sequence in chosen]
        index = as_tensor(rows, torch.long)
        adjusted = apply_penalties(logits[index], self.history,
                                   as_tensor([sequence.penalty_slot for sequence in chosen], torch.long),
                                   as_tensor([s.repetition_penalty for s in samplings]),
                                   as_tensor([s.presence_penalty for s in samplings]),
                                   as_tensor([s.frequency_penalty for s in samplings]))
        biased = [(i, token, bias) for i, sampling in enumerate(samplings) for token, bias in sampling.logit_bias]
        if biased:  # OpenAI's logit_bias: added to the logits before the choice
            where = (as_tensor([i for i, _, _ in biased], torch.long), as_tensor([t for _, t, _ in biased], torch.long))
            adjusted[where] += as_tensor([bias for _, _, bias in biased])
        banned = [(i, word[-1]) for i, sequence in enumerate(chosen) for word in sequence.sampling.bad_words
                  if sequence.ends_with(word[:-1])]
        if banned:
            adjusted[as_tensor([i for i, _ in banned], torch.long), as_tensor([t for _, t in banned], torch.long)] = \
                float("-inf")
        # Before min_length, no token that would end the request: the end token and the stop token ids.
        too_short = [(i, token) for i, sequence in enumerate(chosen)
                     if len(sequence.output) < sequence.sampling.min_length for token in sequence.sampling.ending_ids]
        adjusted = forbid_end(adjusted, [i for i, _ in too_short], [token for _, token in too_short])
        return logits.index_copy(0, index, adjusted), greedy.index_copy(0, index, adjusted.argmax(dim=-1))

    @staticmethod
    def _draw(sequences: list[Sequence], logits: torch.Tensor, greedy: torch.Tensor, rows: list[int],
              wants_log_probs: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The argmax with the given rows' tokens drawn from their seeds; with log-probs
        wanted, the logits with those rows' nucleus distributions (what they were drawn from)."""
        index = on_device(rows, logits.device)
        drawn = [sequences[row] for row in rows]
        samplings = [sequence.sampling for sequence in drawn]
        if any(sampling.min_p > 0 for sampling in samplings):  # what min_p drops is never drawn nor counted
            logits = logits.index_copy(0, index, min_p_logits(logits[index], samplings))
        tokens = sample_rows(logits[index], samplings, [sequence.seed for sequence in drawn],
                             [len(sequence.output) for sequence in drawn])
        greedy = greedy.index_copy(0, index, tokens.to(greedy.dtype))
        if wants_log_probs:
            logits = logits.index_copy(0, index, nucleus_logits(logits[index], samplings))
        return logits, greedy

    @staticmethod
    def _beam_parents(plan: StepPlan, logits: torch.Tensor) -> dict[BeamGroup, list[int]]:
        """One search step of each beam request that reads its running beams' log-softmax:
        for each new running beam, the index of the beam it continues."""
        rows: dict[BeamGroup, list[int]] = {}
        for row, sequence in enumerate(plan.sequences):
            if sequence.group is not None and not plan.reading[row]:
                rows.setdefault(sequence.group, []).append(row)
        return {group: group.search.step(logits[torch.tensor(group_rows, device=logits.device)].log_softmax(dim=-1))
                for group, group_rows in rows.items()}


def _stop_tokens_as_end(sequences: list[Sequence], tokens: list[int]) -> list[int]:
    """The step's tokens with each row's stop_token_ids given as its end token, which the
    scheduler ends the request at without returning it (-1, no end token, ends it too)."""
    if not any(sequence.sampling.stop_token_ids for sequence in sequences):
        return tokens
    return [sequence.sampling.end_id if token in sequence.sampling.stop_token_ids else token
            for sequence, token in zip(sequences, tokens)]
