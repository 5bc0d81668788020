"""Token selection: greedy (top_k 1), or sampling with temperature, top_k and
top_p, for every sampled row of a step at once, reproducible per request from its
seed. top_p 0 (the default, as in TensorRT-LLM) or 1 means no nucleus filtering."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from glm_engine import GlmEngineError
from glm_engine.config import MAX_SEED


@dataclass(frozen=True)
class SamplingConfig:
    """How to choose each new token and when to stop."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 0.0
    random_seed: int | None = None
    end_id: int = 2  # -1: no token ends a sequence
    # runtime/penalties.py: 1.0, 0.0, 0.0 and 0 change nothing.
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_length: int = 0  # new tokens before the end token may come
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences never completed (a word's last token is banned)
    output_log_probs: bool = False  # report each token's log-probability (StepResult.log_probs)
    stop_words: tuple[str, ...] = ()  # text that ends a request, not returned (runtime/stop_words.py)
    # Beam search (runtime/beam_search.py), as Hugging Face generate's; 1 beam: greedy or sampling.
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never"
    num_return_sequences: int = 1  # best beams returned (Session.generate_beams)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GlmEngineError(f"max_output_len must be at least 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature):
            raise GlmEngineError(f"temperature must be a finite number, got {self.temperature}")
        if self.random_seed is not None and not 0 <= self.random_seed <= MAX_SEED:
            raise GlmEngineError(f"random_seed must be within [0, 2**64), got {self.random_seed}")
        if self.temperature <= 0:
            raise GlmEngineError(f"temperature must be positive, got {self.temperature}; use --top_k 1 "
                                 "for greedy decoding")
        if self.top_k < 0:
            raise GlmEngineError(f"top_k must be >= 0 (0: no top-k filter), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise GlmEngineError(f"top_p must be within [0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise GlmEngineError(f"repetition_penalty must be a positive finite number (1: off), got "
                                 f"{self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise GlmEngineError(f"{name} must be a finite number (0: off), got {getattr(self, name)}")
        if self.min_length < 0:
            raise GlmEngineError(f"min_length must be >= 0, got {self.min_length}")
        self._check_beams()
        if not all(isinstance(word, str) and word for word in self.stop_words):
            raise GlmEngineError(f"stop words must be non-empty strings, got {self.stop_words!r}")
        if not all(word and all(isinstance(token, int) and token >= 0 for token in word) for word in self.bad_words):
            raise GlmEngineError(f"bad words must be non-empty sequences of token ids, got {self.bad_words!r}")

    def _check_beams(self) -> None:
        if self.num_beams < 1:
            raise GlmEngineError(f"num_beams must be at least 1, got {self.num_beams}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise GlmEngineError(f"num_return_sequences must be within [1, num_beams {self.num_beams}], got "
                                 f"{self.num_return_sequences}")
        if self.early_stopping not in (True, False, "never"):
            raise GlmEngineError(f"early_stopping must be true, false or never, got {self.early_stopping!r}")
        if not math.isfinite(self.length_penalty):
            raise GlmEngineError(f"length_penalty must be a finite number, got {self.length_penalty}")
        if self.num_beams == 1:
            return
        others = [name for name, on in (("sampling (top_k != 1)", self.top_k != 1),
                                         ("penalties, min_length or bad words", self.changes_logits),
                                         ("stop words", bool(self.stop_words)),
                                         ("log-probs", self.output_log_probs)) if on]
        if others:
            raise GlmEngineError(f"beam search with {others[0]} is not built yet; use num_beams 1 or drop it")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1

    @property
    def changes_logits(self) -> bool:
        """Whether the logits change before the choice (penalties, bad words, a minimum length)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.min_length > 0 or bool(self.bad_words))


# splitmix64's constants, as signed 64-bit integers (torch has no unsigned arithmetic).
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _shift_right(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (>> on torch's int64 is arithmetic)."""
    return (values >> bits) & ((1 << (64 - bits)) - 1)


def _mix(state: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 values (multiplications wrap, as in the reference)."""
    state = (state ^ _shift_right(state, 30)) * _MIX1
    state = (state ^ _shift_right(state, 27)) * _MIX2
    return state ^ _shift_right(state, 31)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Float64 uniforms in (0, 1), [R, vocab]: splitmix64 over each row's key (its seed,
    then its step, each mixed in) plus the token id. Counter-based, so a request's draws
    depend on its seed and how many tokens it has made, never on the batch it shares or
    on preemption."""
    row_keys = _mix(_mix(seeds * _GOLDEN) + steps * _GOLDEN)
    token_ids = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=seeds.device)
    state = _mix(row_keys[:, None] + token_ids[None, :] * _GOLDEN)
    return (_shift_right(state, 11).to(torch.float64) + 0.5) / 2.0**53


def sample_rows(logits: torch.Tensor, samplings: list[SamplingConfig], seeds: list[int],
                steps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token id per row of float32 logits [R, vocab], row r drawn with samplings[r]
    (temperature, top-k, top-p) from the noise of (seeds[r], steps[r]), for all rows in
    one pass: filtered logits plus Gumbel noise, argmax (exact sampling from the
    filtered softmax). Also returns the filtered logits (the drawn-from distribution)."""
    device = logits.device
    column = lambda values, dtype=torch.float32: torch.tensor(values, dtype=dtype, device=device)[:, None]  # noqa: E731
    logits = logits / column([sampling.temperature for sampling in samplings])
    top_ps = [sampling.top_p if 0.0 < sampling.top_p < 1.0 else 1.0 for sampling in samplings]
    if any(sampling.top_k > 0 for sampling in samplings) or min(top_ps) < 1.0:  # decided on the host: no sync
        top_k = column([sampling.top_k for sampling in samplings], torch.int64)
        top_p = column(top_ps)
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        rank = torch.arange(logits.shape[1], device=device)[None, :]
        probs = ordered.softmax(dim=-1)
        # Drop a token past the row's top_k, or once the tokens ranked before it reach top_p.
        drop = ((top_k > 0) & (rank >= top_k)) | ((probs.cumsum(dim=-1) - probs >= top_p) & (top_p < 1.0))
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    signed = [seed - 2**64 if seed >= 2**63 else seed for seed in seeds]
    noise = uniform_noise(column(signed, torch.int64)[:, 0], column(steps, torch.int64)[:, 0], logits.shape[1])
    gumbel = -torch.log(-torch.log(noise))
    return (logits.double() + gumbel).argmax(dim=-1), logits
