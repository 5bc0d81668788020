"""Token selection: greedy (top_k 1), or sampling with temperature, top_k and
top_p from a seeded generator. top_p 0 (the default, as in TensorRT-LLM) or 1
means no nucleus filtering."""

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

    @property
    def greedy(self) -> bool:
        return self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Whether the logits change before the choice (penalties or a minimum length)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.min_length > 0)


def sample(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """One token id per row of float32 logits [B, vocab]."""
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    if config.top_k > 1:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked before it already reach top_p.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= config.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
