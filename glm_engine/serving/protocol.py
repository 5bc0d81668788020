"""The request side of serve.py's API: OpenAI's request bodies (and vLLM's extra
sampling fields) parsed with types as strict as OpenAI's, refusals in OpenAI's error
shape, and a body's fields turned into the engine's SamplingConfig, one per choice.

Every field is either implemented or refused with a 400 naming it and why; the fields
OpenAI itself treats as hints (user, metadata, store, service_tier) are accepted and
ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from glm_engine import GlmEngineError
from glm_engine.config import MAX_SEED
from glm_engine.runtime.sampling import MAX_LOGIT_BIAS, MAX_TOP_LOG_PROBS, SamplingConfig
from glm_engine.runtime.session import EngineLimits
from glm_engine.runtime.structured_output import response_format_grammar

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # each stop string's; the engine searches every step's new text for each
MAX_COMPLETION_LOG_PROBS = 5  # OpenAI's limit of /v1/completions' logprobs


class _Strict(BaseModel):
    # A field we do not implement is an error, never ignored; types are OpenAI's: no 8.0 or true
    # for an integer, no "yes" for a boolean (an integer is still a number).
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None  # a last chunk with the usage and no choices


Bias = Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]


class _Generation(_Strict):
    """The fields both generation endpoints take; None stands for OpenAI's default."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Bias] | None = None  # token id (as a string) -> added to its logit
    response_format: dict[str, Any] | None = None
    # Hints OpenAI's API takes that change no token: accepted, ignored.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # vLLM's extensions
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0: no top-k filter
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_tokens: int | None = Field(default=None, ge=0)  # no end token before this many tokens
    stop_token_ids: list[int] | None = None
    use_beam_search: bool | None = None
    best_of: int | None = Field(default=None, ge=1, le=16)

    @property
    def choices(self) -> int:
        """n: the choices asked for each prompt."""
        return self.n or 1

    def output_limit(self) -> int | None:
        """The tokens asked for at most (None: the engine's max_output_len)."""
        return self.max_tokens

    def log_probs(self) -> tuple[bool, int]:
        """Whether each token's log-prob is asked, and how many top alternatives."""
        return False, 0


class CompletionRequest(_Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None  # the prompt's text before the completion
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOG_PROBS)

    def log_probs(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class CalledFunction(_Strict):
    name: str
    arguments: str  # JSON text


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: OpenAI's newer name of system
    content: str | list[TextPart] | None = None  # None only beside an assistant's tool_calls
    tool_calls: list[ToolCall] | None = None  # an assistant's function calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None  # a hint OpenAI takes (the participant's name)

    @property
    def text(self) -> str:
        """The message's text (its text parts joined)."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)

    @property
    def prompt_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class FunctionSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOG_PROBS)
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=128)  # function calling, in GLM-4's format (serving/tool_calls.py)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # a hint: GLM-4 calls one function a turn
    # OpenAI's deprecated names of tools and tool_choice: refused by name (check_no_tools).
    functions: list[Any] | None = None
    function_call: Any = None

    def output_limit(self) -> int | None:
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ApiError(400, f"max_tokens {self.max_tokens} and max_completion_tokens {self.max_completion_tokens} "
                                "differ; they name the same limit, send one", param="max_completion_tokens")
        return self.max_completion_tokens or self.max_tokens

    def log_probs(self) -> tuple[bool, int]:
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs true", param="top_logprobs")
        return bool(self.logprobs), self.top_logprobs or 0


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt's text, or chat messages as the chat endpoint formats them."""

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool | None = None  # the [gMASK] sop prefix every completion prompt gets (default true)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


_Body = TypeVar("_Body", bound=_Strict)


class ApiError(Exception):
    """A request refused with HTTP `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None) -> JSONResponse:
    """OpenAI's error body with HTTP `status`."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


async def read_body(request: Request, model: type[_Body], max_bytes: int) -> _Body:
    """The request's JSON body as a `model`. Refused with 413 past `max_bytes` (before it
    is read when its Content-Length says so), with 400 when it is not JSON of the
    model's fields and types."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    try:
        return model.model_validate_json(b"".join(chunks))
    except ValidationError as error:
        raise _invalid(error) from None


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the body is over this server's {max_bytes} bytes, more than a prompt of the "
                         "engine's max_input_len tokens takes; shorten the prompt")


def _invalid(error: ValidationError) -> ApiError:
    """400 naming the problems of a body's first wrong field (each type a field may take,
    for one such as prompt's `str | list[int]`); param names the field (a JSON syntax
    error's place in the text is part of the message, not a field)."""
    problems = error.errors(include_url=False)
    if problems[0]["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {problems[0]['msg'].removeprefix('Invalid JSON: ')}; "
                             "send one UTF-8 JSON object")
    if problems[0]["type"] == "extra_forbidden":
        name = _where(problems[0]["loc"])
        return ApiError(400, f"{name}: this server does not implement this field; leave it out", param=name)
    field = problems[0]["loc"][:1]
    said = dict.fromkeys(f"{_where(problem['loc']) or 'body'}: {problem['msg']}" for problem in problems
                         if problem["loc"][:1] == field)
    return ApiError(400, "; ".join(said), param=_where(problems[0]["loc"]))


def _where(loc: tuple) -> str | None:
    """A field's path as `messages.0.content`, without the names pydantic gives a union's
    types in it (`prompt.list[int].0`, `content.str`)."""
    return ".".join(str(part) for part in loc
                    if not (isinstance(part, str) and ("[" in part or part in {"str", "int"}))) or None


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """A request's stop strings; refuses more than MAX_STOP_STRINGS, empty ones and ones
    over MAX_STOP_CHARS characters (the engine searches each step's text for each)."""
    strings = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(strings) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop holds {len(strings)} strings; at most {MAX_STOP_STRINGS} are allowed",
                       param="stop")
    for index, string in enumerate(strings):
        if not 1 <= len(string) <= MAX_STOP_CHARS:
            raise ApiError(400, f"stop string {index} has {len(string)} characters; each must have 1 to "
                                f"{MAX_STOP_CHARS}", param="stop")
    return strings


def _token_ids(ids: list[int], vocab_size: int, param: str) -> tuple[int, ...]:
    bad = [token for token in ids if not 0 <= token < vocab_size]
    if bad:
        raise ApiError(400, f"{param} holds token id {bad[0]}, outside the vocabulary [0, {vocab_size})", param=param)
    return tuple(ids)


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias ({"token id": bias}) as (token id, bias) pairs."""
    if not bias:
        return ()
    if not all(key.isdigit() for key in bias):
        wrong = next(key for key in bias if not key.isdigit())
        raise ApiError(400, f"logit_bias keys are token ids, got {wrong!r}", param="logit_bias")
    ids = _token_ids([int(key) for key in bias], vocab_size, "logit_bias")
    return tuple(zip(ids, bias.values()))


def check_no_tools(body: ChatRequest) -> None:
    """OpenAI's deprecated function-calling fields get a 400 naming them and their successors."""
    for name, successor in (("functions", "tools"), ("function_call", "tool_choice")):
        if getattr(body, name) is not None:
            raise ApiError(400, f"{name} is OpenAI's deprecated name of {successor}; send {successor}", param=name)


def token_choice(body: _Generation) -> dict:
    """SamplingConfig's temperature, top_k, top_p and min_p of a body: temperature 0 (or
    top_k 1) is greedy; OpenAI's default temperature is 1."""
    temperature = 1.0 if body.temperature is None else body.temperature
    top_k = 0 if body.top_k in (None, -1) else body.top_k
    if temperature == 0.0 or top_k == 1:
        return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
    return {"temperature": temperature, "top_k": top_k, "top_p": 1.0 if body.top_p is None else body.top_p,
            "min_p": body.min_p or 0.0}


def beams(body: _Generation) -> dict:
    """SamplingConfig's beam fields: vLLM's use_beam_search searches best_of beams (default
    n) and returns the best; best_of alone (the best of several samples) is refused."""
    if not body.use_beam_search:
        if body.best_of not in (None, body.choices):
            raise ApiError(400, f"best_of {body.best_of}: returning the best of several samples is not implemented; "
                                "leave best_of out (or set use_beam_search for a beam search of best_of beams)",
                           param="best_of")
        return {}
    if body.choices != 1:
        raise ApiError(400, f"use_beam_search returns the best beam as the one choice; n must be 1, got {body.n}",
                       param="n")
    return {"num_beams": body.best_of or 1}


def check_response_format(response_format: dict | None) -> dict | None:
    """The body's response_format, checked (a schema that cannot be compiled is a 400)."""
    if response_format is None:
        return None
    if response_format.get("type") == "lark":  # the server's own grammars only
        raise ApiError(400, 'response_format.type must be "text", "json_object" or "json_schema", got \'lark\'',
                       param="response_format")
    try:
        response_format_grammar(response_format)
    except GlmEngineError as error:
        raise ApiError(400, str(error), param="response_format") from None
    return response_format


def samplings(body: _Generation, limits: EngineLimits, tool_format: dict | None = None) -> list[SamplingConfig]:
    """One SamplingConfig per choice (n) of a request (`tool_format`: the grammar of a
    required function call, in place of the body's response_format); refuses lengths
    outside the engine's and combinations the engine refuses (400 with its reason)."""
    max_output_len = limits.build_config.max_output_len
    asked = body.output_limit()
    max_tokens = max_output_len if asked is None else asked
    if max_tokens > max_output_len:
        param = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
        raise ApiError(400, f"{param} {max_tokens} is over the engine's max_output_len {max_output_len}",
                       param=param)
    min_tokens = body.min_tokens or 0
    if min_tokens > max_tokens:
        raise ApiError(400, f"min_tokens {min_tokens} is over max_tokens {max_tokens}", param="min_tokens")
    output_log_probs, top_log_probs = body.log_probs()
    options = dict(max_new_tokens=max_tokens, end_id=limits.end_id, stop_words=stop_strings(body.stop),
                   presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
                   repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                   min_length=min_tokens, output_log_probs=output_log_probs, top_log_probs=top_log_probs,
                   logit_bias=logit_bias(body.logit_bias, limits.vocab_size),
                   stop_token_ids=_token_ids(body.stop_token_ids or [], limits.vocab_size, "stop_token_ids"),
                   response_format=tool_format or check_response_format(body.response_format), **token_choice(body),
                   **beams(body))
    if options.get("num_beams", 1) == 1:  # the model's other end ids end a request too (beam search takes one)
        options["stop_token_ids"] = tuple(dict.fromkeys((*options["stop_token_ids"], *limits.more_end_ids)))
    seeds = [None if body.seed is None else (body.seed + choice) % (MAX_SEED + 1) for choice in range(body.choices)]
    try:
        return [SamplingConfig(**options, random_seed=seed) for seed in seeds]
    except GlmEngineError as error:
        raise ApiError(400, str(error)) from None
