"""Draft-model drafting (--speculative_decoding_mode draft_model): a smaller engine with
the same vocabulary guesses each sequence's next tokens greedily, one decode step of
every drafting sequence at a time, over its own KV cache (and CUDA graphs). Each
sequence's draft-side cache follows its tokens: a round first feeds the draft engine
the tokens it has not seen (the prompt the first time; then the target's accepted and
new tokens), its K/V of rejected guesses written over, then drafts. Greedy guesses
are deterministic proposals, which verification's rejection sampling takes as they are
(runtime/verification.py)."""

from __future__ import annotations

from typing import Any

from glm_engine import GlmEngineError
from glm_engine.config import BuildConfig, ModelConfig
from glm_engine.runtime.drafting import DraftState


def check_draft_engine(draft: ModelConfig, draft_build: BuildConfig, target: ModelConfig,
                       target_build: BuildConfig) -> None:
    """Raises GlmEngineError when the draft engine cannot draft for the target: another
    vocabulary, or positions short of the target's longest sequence (a draft never goes
    past it)."""
    if draft.vocab_size != target.vocab_size:
        raise GlmEngineError(f"--draft_engine_dir has a vocabulary of {draft.vocab_size} tokens and the engine "
                             f"{target.vocab_size}; build the draft from a checkpoint with the same tokenizer")
    if draft_build.max_sequence_len < target_build.max_sequence_len:
        raise GlmEngineError(f"--draft_engine_dir holds sequences of {draft_build.max_sequence_len} tokens, fewer "
                             f"than the engine's {target_build.max_sequence_len}; rebuild the draft with larger "
                             "--max_input_len/--max_output_len")


class DraftModel:
    """Drafts with `draft`, a Session of the draft engine (checked by check_draft_engine; its
    runner and block manager are used, its scheduler is not)."""

    def __init__(self, draft: Any) -> None:
        self.runner, self.block_manager = draft.runner, draft.block_manager

    def propose(self, tokens: list[list[int]], states: list[DraftState], lengths: list[int]) -> list[list[int]]:
        """See Drafter.propose: each sequence's greedy guesses by the draft engine (none for
        one its KV pool cannot hold now)."""
        drafts: list[list[int]] = [[] for _ in tokens]
        rows = [row for row, (sequence, state, length) in enumerate(zip(tokens, states, lengths))
                if self._make_room(sequence, state, length)]
        # Catch up: every token the draft has not cached, the last one's logits guessing the first.
        fed = [tokens[row][states[row].draft_cached:] for row in rows]
        while rows:
            states_now = [states[row] for row in rows]
            _, greedy = self.runner.execute([state.draft_table for state in states_now],
                                            [state.draft_cached for state in states_now], fed)
            for row, state, new, guess in zip(rows, states_now, fed, greedy.tolist()):
                state.draft_cached += len(new)
                drafts[row].append(guess)
            rows = [row for row in rows if len(drafts[row]) < lengths[row]]  # the others are done
            fed = [[drafts[row][-1]] for row in rows]
        for row, state in enumerate(states):
            if drafts[row]:  # the guesses fed after its tokens, which the next round may confirm
                state.draft_cached, state.draft_guesses = len(tokens[row]), drafts[row][:-1]
        return drafts

    def _make_room(self, tokens: list[int], state: DraftState, length: int) -> bool:
        """Settles what the draft engine's cache holds of `tokens` (its guesses that the
        target accepted count), and takes the blocks the round needs; False when its pool
        has too few free blocks."""
        confirmed = state.draft_cached
        for guess, token in zip(state.draft_guesses, tokens[confirmed:]):
            if guess != token:
                break
            confirmed += 1
        state.draft_cached = min(confirmed, len(tokens) - 1)  # the last token is fed again: its logits guess
        state.draft_guesses = []
        return self.block_manager.grow(state.draft_table, len(tokens) + length)

    def release(self, state: DraftState) -> None:
        """Frees a retired sequence's draft-side blocks (its cache is recomputed if it runs again)."""
        self.block_manager.release(state.draft_table)
        state.draft_cached, state.draft_guesses = 0, []
