"""Structured output: OpenAI's `response_format` (json_object, json_schema) compiled by
llguidance into a grammar over the engine's vocabulary. Each constrained request holds
a matcher; at each step the matcher says which tokens keep the output a prefix of a
valid text (a bitmask, one bit a token), the sampler sets every other token's logit to
-inf before choosing (greedy and sampled alike), and the scheduler feeds the chosen
token back. Once the text is complete only the end token is allowed; a request that
ignores the end token ends there.

The masks of a step are computed on the host while the GPU runs the step's forward
(the sampler asks for them before it reads anything back), all rows at once on
llguidance's own threads."""

from __future__ import annotations

import functools
import json
from typing import Any

import torch

from glm_engine import GlmEngineError

# Compact JSON, as OpenAI's structured outputs write it: whitespace between tokens is
# otherwise free, and a sampled model may spend its whole budget on it.
JSON_OPTIONS = {"whitespace_flexible": False}


def _llguidance() -> Any:
    try:
        import llguidance  # (not llguidance.torch: its torch.compile import costs seconds of start-up)
    except ImportError:
        raise GlmEngineError("structured output (response_format) needs the llguidance package: "
                             "pip install llguidance") from None
    return llguidance


def response_format_grammar(response_format: dict) -> str | None:
    """The grammar of an OpenAI `response_format`: None for {"type": "text"}, any JSON
    object for "json_object", the schema's JSON for "json_schema" ({"name", "schema",
    "strict", "description"}). A schema llguidance cannot compile raises GlmEngineError
    naming why (a bad request)."""
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "lark":  # the server's own grammars (a required tool call), never a client's
        return _checked(_llguidance().LLMatcher.grammar_from_lark(response_format["lark"]), "the tool call's grammar")
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise GlmEngineError('response_format.json_schema must be an object with a "schema" object')
        schema = spec.get("schema", {})
    else:
        raise GlmEngineError(f'response_format.type must be "text", "json_object" or "json_schema", got {kind!r}')
    try:
        grammar = _llguidance().LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as error:
        raise GlmEngineError(f"response_format's JSON schema cannot be used: {error}") from None
    return _checked(grammar, "response_format's JSON schema")


def _checked(grammar: str, what: str) -> str:
    """`grammar`, once llguidance finds no error in it (else GlmEngineError naming `what`)."""
    is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GlmEngineError(f"{what} cannot be used: {messages[0].splitlines()[0]}")  # its first line: one-line errors
    return grammar


def tool_call_format(calls: dict[str, dict]) -> dict:
    """The response_format that keeps an answer to one function call in GLM-4's format,
    "name\\n" then arguments valid under that function's JSON schema, for any of
    `calls` (function name -> parameters schema)."""
    rules = [f"call{index}: {json.dumps(name + chr(10))} args{index}\nargs{index}: %json "
             f"{json.dumps({**schema, 'x-guidance': JSON_OPTIONS})}" for index, (name, schema) in enumerate(calls.items())]
    start = " | ".join(f"call{index}" for index in range(len(calls)))
    return {"type": "lark", "lark": f"start: {start}\n" + "\n".join(rules) + "\n"}


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads of a tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        tokens = tokenizer.token_bytes()[:vocab_size]
        # Ids past the tokenizer's (an engine's padded vocabulary) are special: never allowed.
        self.tokens = tokens + [b"\xff<unused %d>" % token_id for token_id in range(len(tokens), vocab_size)]
        self.special_token_ids = [token_id for token_id, piece in enumerate(self.tokens) if piece[:1] == b"\xff"]
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode_within_text(text)


class GrammarTokenizer:
    """llguidance's view of a tokenizer over an engine's `vocab_size` ids: makes each
    request's matcher."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        llguidance = _llguidance()
        self.vocab_size = vocab_size
        self.lltokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer, vocab_size)),
                                                  n_vocab=vocab_size)
        self._matcher = llguidance.LLMatcher

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher of `grammar` (response_format_grammar's)."""
        matcher = self._matcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GlmEngineError(f"response_format cannot be used: {matcher.get_error()}")
        return matcher


@functools.cache
def _executor() -> Any:
    return _llguidance().LLExecutor()


def fill_masks(matchers: list[Any], vocab_size: int, end_ids: list[int]) -> torch.Tensor:
    """int32 [len(matchers), ceil(vocab_size / 32)] on the host: bit j of word i allows
    token 32 i + j, all rows filled at once on llguidance's threads. A row whose matcher
    failed, or allows nothing, allows only its end id (every token when it has none: the
    scheduler ends it on the matcher's stop)."""
    words = torch.zeros(len(matchers), (vocab_size + 31) // 32, dtype=torch.int32)
    _executor().unsafe_compute_mask_ptr([(matcher, row) for row, matcher in enumerate(matchers)],
                                        words.data_ptr(), words.shape[1] * 4, len(matchers))
    for row, (matcher, end_id) in enumerate(zip(matchers, end_ids)):
        if matcher.is_error() or not bool(words[row].any()):
            words[row] = 0 if 0 <= end_id < vocab_size else -1
            if 0 <= end_id < vocab_size:
                words[row, end_id // 32] = _bit(end_id % 32)
    return words


def _bit(index: int) -> int:
    """The int32 value with only bit `index` set (bit 31: the sign bit)."""
    return -(1 << 31) if index == 31 else 1 << index


def allowed_tokens(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [R, vocab_size] of int32 mask words [R, W] (bit j of word i: token 32 i + j)."""
    bits = torch.arange(32, dtype=torch.int32, device=words.device)
    return ((words[:, :, None] >> bits) & 1).flatten(1)[:, :vocab_size].bool()


def mask_logits(logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """`logits` [R, vocab] with every token its row's mask words do not allow at -inf."""
    return logits.masked_fill(~allowed_tokens(words.to(logits.device, non_blocking=True), logits.shape[1]),
                              float("-inf"))

