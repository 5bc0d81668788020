"""Repetition, presence and frequency penalties and the minimum length, applied to
a step's logits for every penalized sequence at once on the logits' device.

Each penalized sequence holds a row (a slot) of two [slots, vocab] tables kept on
the device: how often each token appears in its output, and which tokens its prompt
holds. A slot is filled from the sequence's tokens when it first needs one (again
after a preemption) and updated with one scatter per step for all rows, so a step
costs a few batched ops whatever the number of sequences.

Semantics: repetition_penalty as Hugging Face's RepetitionPenaltyLogitsProcessor
(over prompt and output: positive logits divided by it, negative ones multiplied);
presence and frequency penalties as OpenAI's (over the output: minus presence once
a token appeared, minus frequency per appearance); min_length as Hugging Face's
min_new_tokens (the end token is impossible until that many tokens are out)."""

from __future__ import annotations

import torch

from glm_engine.runtime.sampling import on_device


class TokenHistory:
    """The device-side token tables of up to `slots` penalized sequences."""

    def __init__(self, slots: int, vocab_size: int, device: torch.device) -> None:
        self.output_counts = torch.zeros((slots, vocab_size), dtype=torch.int32, device=device)
        self.in_prompt = torch.zeros((slots, vocab_size), dtype=torch.bool, device=device)
        self.free = list(range(slots - 1, -1, -1))

    def take(self, prompt: list[int], output: list[int]) -> int:
        """A slot filled from a sequence's tokens so far."""
        slot = self.free.pop()
        device = self.output_counts.device
        self.in_prompt[slot].zero_()
        self.in_prompt[slot, on_device(prompt, device)] = True
        self.output_counts[slot].zero_()
        if output:
            self.output_counts[slot].index_put_((on_device(output, device),),
                                                torch.ones(len(output), dtype=torch.int32, device=device),
                                                accumulate=True)
        return slot

    def give_back(self, slot: int) -> None:
        self.free.append(slot)

    def record(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Counts each row's new token (rows ending their sequence included: harmless)."""
        self.output_counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)


def apply_penalties(logits: torch.Tensor, history: TokenHistory, slots: torch.Tensor, repetition: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Penalized copies of float32 logits [R, vocab] of R sequences in `slots`, each
    with its own penalties ([R] tensors; 1, 0, 0 leave a row unchanged)."""
    counts = history.output_counts[slots]
    seen = history.in_prompt[slots] | (counts > 0)
    factor = torch.where(logits > 0, 1.0 / repetition[:, None], repetition[:, None])
    logits = torch.where(seen, logits * factor, logits)
    return logits - presence[:, None] * (counts > 0) - frequency[:, None] * counts


def forbid_end(logits: torch.Tensor, rows: list[int], end_ids: list[int]) -> torch.Tensor:
    """Logits with each given row's end token at -inf (in place). The rows are chosen on the
    host (their lengths are known there), so no step waits on the device for them."""
    if rows:
        device = logits.device
        logits[on_device(rows, device), on_device(end_ids, device)] = float("-inf")
    return logits
