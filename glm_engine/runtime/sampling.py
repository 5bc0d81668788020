"""Token selection: greedy (top_k 1), or sampling with temperature, top_k, top_p and
min_p, for every sampled row of a step at once, reproducible per request from its
seed. top_p 0 (the default, as in TensorRT-LLM) or 1 means no nucleus filtering.
Any positive temperature works: the tiniest sample what greedy chooses (their limit),
never overflowing into NaN."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from glm_engine import GlmEngineError
from glm_engine.config import MAX_SEED
from glm_engine.kernels import reference

# Penalties beyond these already outweigh any logit a model gives, and larger ones would
# overflow float32 logits into inf and NaN: refused rather than saturated.
MAX_PENALTY = 1e20  # |presence_penalty|, |frequency_penalty|; repetition_penalty within [1 / this, this]
MAX_TOP_LOG_PROBS = 20  # OpenAI's top_logprobs limit
MAX_LOGIT_BIAS = 100.0  # OpenAI's: -100 bans a token, 100 makes it the only choice


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
    top_log_probs: int = 0  # with output_log_probs: also the N likeliest tokens of each step (LogProb.top)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, value added to its logit), as OpenAI's
    min_p: float = 0.0  # sampled rows: drop tokens less likely than min_p times the likeliest (0: off)
    stop_token_ids: tuple[int, ...] = ()  # tokens that end a request as the end token does (not returned)
    stop_words: tuple[str, ...] = ()  # text that ends a request, not returned (text/stop_words.py)
    # Beam search (runtime/beam_search.py), as Hugging Face generate's; 1 beam: greedy or sampling.
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never"
    num_return_sequences: int = 1  # best beams returned (RequestOutput.beams)
    # OpenAI's response_format ({"type": "json_object"} or "json_schema"): outputs kept to
    # the grammar it compiles to (runtime/structured_output.py); None or "text": free text.
    response_format: dict | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GlmEngineError(f"max_output_len must be at least 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature):
            raise GlmEngineError(f"temperature must be a finite number, got {self.temperature}")
        if self.random_seed is not None and not 0 <= self.random_seed <= MAX_SEED:
            raise GlmEngineError(f"random_seed must be within [0, 2**64), got {self.random_seed}")
        if self.temperature <= 0:
            raise GlmEngineError(f"temperature must be positive, got {self.temperature}; for greedy decoding "
                                 "use top_k 1 and leave temperature out")
        if self.top_k < 0:
            raise GlmEngineError(f"top_k must be >= 0 (0: no top-k filter), got {self.top_k}")
        if self.top_k == 1 and self.temperature != 1.0:
            raise GlmEngineError(f"temperature {self.temperature} has no effect with top_k 1 (greedy decoding); "
                                 "set top_k 0 (or above 1) to sample, or leave temperature out")
        if not 0.0 <= self.top_p <= 1.0:
            raise GlmEngineError(f"top_p must be within [0, 1], got {self.top_p}")
        self._check_penalties()
        self._check_extras()
        if self.min_length < 0:
            raise GlmEngineError(f"min_length must be >= 0, got {self.min_length}")
        self._check_beams()
        if self.response_format is not None and not isinstance(self.response_format, dict):
            raise GlmEngineError(f"response_format must be an object such as {{\"type\": \"json_object\"}}, got "
                                 f"{self.response_format!r}")
        if not all(isinstance(word, str) and word for word in self.stop_words):
            raise GlmEngineError(f"stop words must be non-empty strings, got {self.stop_words!r}")
        if not all(word and all(isinstance(token, int) and token >= 0 for token in word) for word in self.bad_words):
            raise GlmEngineError(f"bad words must be non-empty sequences of token ids, got {self.bad_words!r}")

    def _check_penalties(self) -> None:
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise GlmEngineError(f"repetition_penalty must be a positive finite number (1: off), got "
                                 f"{self.repetition_penalty}")
        if not 1 / MAX_PENALTY <= self.repetition_penalty <= MAX_PENALTY:
            raise GlmEngineError(f"repetition_penalty must be within [{1 / MAX_PENALTY:g}, {MAX_PENALTY:g}] (1: off; "
                                 f"the bounds already outweigh any logit), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise GlmEngineError(f"{name} must be a finite number (0: off), got {value}")
            if abs(value) > MAX_PENALTY:
                raise GlmEngineError(f"{name} must be within [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (0: off; the bounds "
                                     f"already outweigh any logit), got {value}")

    def _check_extras(self) -> None:
        if not 0 <= self.top_log_probs <= MAX_TOP_LOG_PROBS:
            raise GlmEngineError(f"top_log_probs must be within [0, {MAX_TOP_LOG_PROBS}], got {self.top_log_probs}")
        if self.top_log_probs and not self.output_log_probs:
            raise GlmEngineError("top_log_probs needs output_log_probs on")
        for token, bias in self.logit_bias:
            if not (isinstance(token, int) and token >= 0 and math.isfinite(bias) and abs(bias) <= MAX_LOGIT_BIAS):
                raise GlmEngineError(f"logit_bias maps token ids >= 0 to numbers within [-{MAX_LOGIT_BIAS:g}, "
                                     f"{MAX_LOGIT_BIAS:g}], got {token!r}: {bias!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise GlmEngineError(f"min_p must be within [0, 1], got {self.min_p}")
        if not all(isinstance(token, int) and token >= 0 for token in self.stop_token_ids):
            raise GlmEngineError(f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}")

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
                                         ("penalties, min_length, bad words or logit_bias", self.changes_logits),
                                         ("min_p", self.min_p > 0.0),
                                         ("stop words or stop_token_ids", bool(self.stop_words or self.stop_token_ids)),
                                         ("log-probs", self.output_log_probs),
                                         ("response_format", self.response_format is not None)) if on]
        if others:
            raise GlmEngineError(f"beam search with {others[0]} is not built yet; use num_beams 1 or drop it")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1

    @property
    def changes_logits(self) -> bool:
        """Whether the logits change before the choice (penalties, bad words, a minimum length,
        a logit bias)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.min_length > 0 or bool(self.bad_words) or bool(self.logit_bias))

    @property
    def ending_ids(self) -> tuple[int, ...]:
        """The tokens that end the request: its end token (when it has one) and its stop_token_ids."""
        return ((self.end_id,) if self.end_id >= 0 else ()) + self.stop_token_ids


class LogProb(float):
    """A token's log-probability, with the `top` likeliest tokens of its step as
    ((token id, log-prob), ...), best first, when the request asked (top_log_probs).
    A float, so that it goes wherever a log-probability goes."""

    top: tuple[tuple[int, float], ...]

    def __new__(cls, value: float, top: tuple[tuple[int, float], ...] = ()) -> LogProb:
        made = super().__new__(cls, value)
        made.top = top
        return made

    def __reduce__(self) -> tuple:  # pickles with its alternatives (the engine process sends it)
        return LogProb, (float(self), self.top)


def log_prob_columns(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[torch.Tensor]:
    """float64 columns [R, 1 (+ 2 * top)]: each row's log-probability of `tokens` [R] under
    `logits` [R, vocab] and, with `top`, the ids and log-probs of its `top` likeliest tokens.
    Token ids below 2**53 and float32 log-probs are exact in float64: read with the tokens
    in one read."""
    log_softmax = logits.log_softmax(dim=-1)
    columns = [log_softmax.gather(1, tokens[:, None].long()).double()]
    if top:
        values, ids = log_softmax.topk(top, dim=-1)
        columns += [ids.double(), values.double()]
    return columns


def read_log_prob(entry: list[float], asked: int, top: int) -> float:
    """A row's log-probability from `entry`, its log_prob_columns as read: a LogProb with its
    likeliest `asked` tokens (at most `top`) when asked, else the float."""
    asked = min(asked, top)
    if not asked:
        return entry[0]
    ids, values = entry[1:1 + asked], entry[1 + top:1 + top + asked]
    return LogProb(entry[0], tuple((int(token), value) for token, value in zip(ids, values)))


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 values (the host twin of reference.splitmix64)."""
    values = (values ^ (values >> np.uint64(30))) * np.uint64(reference.MIX1 % 2**64)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(reference.MIX2 % 2**64)
    return values ^ (values >> np.uint64(31))


def on_device(values: list | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`values` (a list, or a host tensor) as a tensor on `device`, its copy queued behind the
    kernels already queued there: torch.tensor(values, device=) would make the host wait for
    them (the step's forward), where it could be queueing the token choice instead."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return host.to(device, non_blocking=True)


def row_keys(seeds: list[int], steps: list[int]) -> torch.Tensor:
    """The noise keys (int64 bit patterns) of requests' `steps`-th tokens: each seed, then
    its step, mixed in, on the host in one vectorized pass. Counter-based, so a request's
    draws depend on its seed and how many tokens it has made, never on the batch it
    shares or on preemption."""
    golden = np.uint64(reference.GOLDEN % 2**64)
    with np.errstate(over="ignore"):  # the multiplications wrap, as splitmix64's do
        keys = _splitmix64(_splitmix64(np.array(seeds, dtype=np.uint64) * golden)
                           + np.array(steps, dtype=np.uint64) * golden)
    return torch.from_numpy(keys.view(np.int64))


def _top_p(sampling: SamplingConfig) -> float:
    return sampling.top_p if 0.0 < sampling.top_p < 1.0 else 1.0


def tempered_logits(logits: torch.Tensor, samplings: list[SamplingConfig]) -> torch.Tensor:
    """Float32 logits [R, vocab], each row less its largest logit, over its temperature:
    softmax and draws are those of logits / temperature, but no temperature overflows.
    The largest become 0 and the others go to -inf as the temperature goes to 0, so the
    tiniest temperatures draw what greedy chooses. Below float32's smallest normal
    number a temperature acts as that number, which draws the same."""
    tiny = torch.finfo(torch.float32).tiny
    temperature = on_device([max(sampling.temperature, tiny) for sampling in samplings], logits.device)
    top = logits.max(dim=-1, keepdim=True).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row of -inf has nothing to shift
    return (logits - top) / temperature[:, None]


def sample_rows(logits: torch.Tensor, samplings: list[SamplingConfig], seeds: list[int],
                steps: list[int]) -> torch.Tensor:
    """One token id per row of float32 logits [R, vocab], row r drawn with samplings[r]
    (temperature, top-k, top-p) from the noise of (seeds[r], steps[r]), all rows at once
    (kernels/draw_tokens.py on a GPU; reference.draw_tokens, the same draws, elsewhere:
    both take the same tempered logits)."""
    device = logits.device
    logits = tempered_logits(logits, samplings)
    keys = on_device(row_keys(seeds, steps), device)
    top_k = on_device([sampling.top_k for sampling in samplings], device, torch.int32)
    top_p = on_device([_top_p(sampling) for sampling in samplings], device, torch.float64)
    if device.type == "cuda":
        from glm_engine.kernels.draw_tokens import draw_tokens

        return draw_tokens(logits, keys, top_k, top_p)
    return reference.draw_tokens(logits, keys, top_k, top_p)


def nucleus_logits(logits: torch.Tensor, samplings: list[SamplingConfig]) -> torch.Tensor:
    """The distributions sample_rows draws from, as logits: each row's tempered logits
    (tempered_logits) with the tokens outside its top-k/top-p nucleus at -inf (for
    log-probabilities). Sorted, so tied logits at the nucleus' edge fall in sort order,
    where the draw keeps the whole tie."""
    device = logits.device
    column = lambda values, dtype=torch.float32: on_device(values, device, dtype)[:, None]  # noqa: E731
    logits = tempered_logits(logits, samplings)
    top_ps = [_top_p(sampling) for sampling in samplings]
    if not any(sampling.top_k > 0 for sampling in samplings) and min(top_ps) >= 1.0:
        return logits
    top_k, top_p = column([sampling.top_k for sampling in samplings], torch.int64), column(top_ps, torch.float64)
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=device)[None, :]
    probs = ordered.double().softmax(dim=-1)
    # Drop a token past the row's top_k, or once the tokens ranked before it reach top_p.
    drop = ((top_k > 0) & (rank >= top_k)) | ((probs.cumsum(dim=-1) - probs >= top_p) & (top_p < 1.0))
    return logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))


def min_p_logits(logits: torch.Tensor, samplings: list[SamplingConfig]) -> torch.Tensor:
    """Float32 logits [R, vocab] with each row's tokens less likely than its min_p times its
    likeliest token (after temperature) at -inf: p_i < min_p * p_max is
    (l_i - l_max) / temperature < log(min_p). Rows with min_p 0 are unchanged."""
    floor = on_device([sampling.temperature * math.log(sampling.min_p) if sampling.min_p > 0 else -math.inf
                       for sampling in samplings], logits.device, torch.float32)
    top = logits.max(dim=-1, keepdim=True).values
    return logits.masked_fill(logits - top < floor[:, None], float("-inf"))
