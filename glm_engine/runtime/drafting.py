"""Speculative decoding's drafts: guesses of each decoding sequence's next tokens that
one forward step then verifies (runtime/verification.py), so that a step can add
several tokens where plain decoding adds one. SpeculativeConfig holds the run-time
choice; PromptLookup drafts by prompt lookup (n-gram matching): the tokens that
followed the latest earlier occurrence of a sequence's last n tokens in its prompt
and output (n from max_ngram down to 1), as TensorRT-LLM's prompt-lookup and vLLM's
n-gram drafting do. Plain Python over token lists: no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from glm_engine import GlmEngineError

MODES = ("prompt_lookup", "draft_model")
# A sequence stops drafting once it has drafted this many tokens and accepted fewer than
# MIN_ACCEPTANCE of them: a verify step costs more than a decode step, and a model that
# does not copy (random weights) would pay that on every step.
ADAPTIVE_WINDOW = 16
MIN_ACCEPTANCE = 0.25
# Steps of more sequences draft nothing: at large batches decode is no longer memory-bound,
# and verify steps are captured as CUDA graphs for up to this many sequences.
DRAFTING_BATCH = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """How a session drafts: `mode` (prompt_lookup or draft_model), up to `max_draft_len`
    tokens a sequence a step (None: as many as the engine's verify steps take), prompt
    lookup's longest n-gram `max_ngram`, and the draft engine's directory (draft_model)."""

    mode: str
    max_draft_len: int | None = None  # None: the engine's --max_draft_len
    max_ngram: int = 3
    draft_engine_dir: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise GlmEngineError(f"--speculative_decoding_mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.max_draft_len is not None and self.max_draft_len < 1:
            raise GlmEngineError(f"--max_draft_len must be at least 1, got {self.max_draft_len}")
        if self.max_ngram < 1:
            raise GlmEngineError(f"--prompt_lookup_max_ngram must be at least 1, got {self.max_ngram}")
        if (self.mode == "draft_model") != (self.draft_engine_dir is not None):
            raise GlmEngineError("--draft_engine_dir goes with --speculative_decoding_mode draft_model (and it "
                                 "needs one)")


def describe(mode: str, counts: dict[str, float]) -> str:
    """One line of a run's speculative counts (Scheduler.speculative_counts)."""
    return (f"speculative decoding ({mode}): {counts['drafted_tokens']} tokens drafted, {counts['accepted_tokens']} "
            f"accepted ({counts['acceptance']:.1%}), {counts['forward_steps_per_token']:.3f} forward steps per "
            "generated token")


@dataclass
class DraftState:
    """One sequence's drafting: its tokens drafted and accepted so far, and prompt lookup's
    index of where each n-gram last ended (n-grams ending before the sequence's last token)."""

    drafted: int = 0
    accepted: int = 0
    last_end: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> index after its latest end
    indexed: int = 0  # tokens whose n-grams ending at them are in last_end
    # Draft-model drafting (runtime/draft_model.py): its block table in the draft engine's
    # pool, the tokens whose K/V it holds there, and its guesses fed after them.
    draft_table: list[int] = field(default_factory=list)
    draft_cached: int = 0
    draft_guesses: list[int] = field(default_factory=list)

    @property
    def keeps_drafting(self) -> bool:
        """Whether its acceptance so far is worth another verify step."""
        return self.drafted < ADAPTIVE_WINDOW or self.accepted >= MIN_ACCEPTANCE * self.drafted


class Drafter(Protocol):
    """What proposes drafts: PromptLookup, or runtime/draft_model.py's DraftModel."""

    def propose(self, tokens: list[list[int]], states: list[DraftState], lengths: list[int]) -> list[list[int]]:
        """Up to lengths[i] guessed next tokens of each sequence whose prompt and output
        are tokens[i]."""

    def release(self, state: DraftState) -> None:
        """Frees what a retired (finished or preempted) sequence's drafting holds."""


class PromptLookup:
    """Drafts the tokens that followed the latest earlier match of a sequence's last n
    tokens, for the longest n <= max_ngram that has one."""

    def __init__(self, max_ngram: int) -> None:
        self.max_ngram = max_ngram

    def propose(self, tokens: list[list[int]], states: list[DraftState], lengths: list[int]) -> list[list[int]]:
        """See Drafter.propose."""
        return [self._one(sequence, state, length) for sequence, state, length in zip(tokens, states, lengths)]

    def release(self, state: DraftState) -> None:
        """Nothing to free: the n-gram index stays valid for the sequence's tokens."""

    def _one(self, tokens: list[int], state: DraftState, length: int) -> list[int]:
        self._index(tokens, state)
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            end = state.last_end.get(tuple(tokens[-n:]))
            if end is not None:
                return tokens[end:end + length]
        return []

    def _index(self, tokens: list[int], state: DraftState) -> None:
        """Records the n-grams ending at each token before the last that is not indexed
        yet (later ends overwrite earlier ones: the latest match wins). Incremental, so a
        step costs O(max_ngram) per new token, not a scan of the sequence."""
        for end in range(state.indexed + 1, len(tokens)):  # n-grams tokens[end - n:end]
            for n in range(1, min(self.max_ngram, end) + 1):
                state.last_end[tuple(tokens[end - n:end])] = end
        state.indexed = max(state.indexed, len(tokens) - 1)
