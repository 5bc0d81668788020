"""The OpenAI-compatible HTTP API of serve.py, on FastAPI: /v1/completions,
/v1/chat/completions (streamed as server-sent events or whole), /v1/models, /health
and /metrics (Prometheus text). Every request goes to the one engine process
(serving/engine_process.py), whose loop batches them in flight; a client that
disconnects is cancelled (its KV blocks freed before the next step); errors have
OpenAI's body: {"error": {"message", "type", "param", "code"}}.

One request cannot hold up the others: bodies, prompt text and stop strings have
limits checked before any work, JSON is parsed with types as strict as OpenAI's, and
prompts are tokenized on a worker thread (SentencePiece lets go of the GIL, so the
event loop serves on). On SIGTERM the engine is closed first (new requests get 503,
running ones the shutdown timeout to finish, then an error), and only then does
uvicorn close the connections, so every request gets its last event."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import FrameType
from typing import Literal, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from glm_engine import GlmEngineError
from glm_engine.text.detokenizer import IncrementalDetokenizer
from glm_engine.text.prompts import chat_prompt_ids
from glm_engine.serving.engine_process import EngineClosed, EngineProcess, EngineRequest, QueueFull
from glm_engine.config import MAX_SEED
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.text.tokenizer import ChatGLMTokenizer


logger = logging.getLogger("openai_server")

DISCONNECT_POLL_SECONDS = 0.5  # how often a whole (not streamed) answer's client is checked
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # each stop string's; the engine searches every step's new text for each
COMPOSED_CHARS = 4  # code points Unicode normalization (NFKC) may compose into one: a Greek vowel and 3 marks
JSON_BYTES_PER_CHAR = 12  # the most one character takes in JSON: a pair of \uXXXX escapes
MESSAGE_JSON_BYTES = 64  # a chat message's JSON around its content (each message adds a token at least)
OTHER_FIELDS_BYTES = 64 * 1024  # the body's other fields, stop strings included
CONNECTIONS_CLOSE_SECONDS = 5.0  # once the engine is closed, for the last events to reach their clients


class _Strict(BaseModel):
    # A field we do not implement is an error, never ignored; types are OpenAI's: no 8.0 or true
    # for an integer, no "yes" for a boolean (an integer is still a number).
    model_config = ConfigDict(extra="forbid", strict=True)


class _Generation(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    min_tokens: int = Field(default=0, ge=0)  # vLLM's extension: no end token before this many tokens


class CompletionRequest(_Generation):
    prompt: str | list[int]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)


_Body = TypeVar("_Body", bound=_Strict)
_UNION_TYPES = {"str", "list[int]", "list[str]"}  # of prompt and stop, as pydantic names them in a field's path


class ApiError(Exception):
    """A request refused with HTTP `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None) -> JSONResponse:
    """OpenAI's error body with HTTP `status`."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def longest_piece_chars(tokenizer: ChatGLMTokenizer) -> int:
    """Characters of the tokenizer's longest text piece (byte, control and unknown pieces
    aside): the most text one token stands for, before Unicode normalization."""
    pieces = tokenizer.sp_model
    return max(len(pieces.id_to_piece(i)) for i in range(pieces.get_piece_size())
               if not (pieces.is_byte(i) or pieces.is_control(i) or pieces.is_unknown(i)))


@dataclass(frozen=True)
class RequestLimits:
    """What a request may hold, checked before any work is done on it: the characters of
    prompt text that max_input_len tokens can stand for (longer text is refused without
    being tokenized) and the bytes of a body holding such a prompt (larger: HTTP 413)."""

    max_input_len: int
    chars_per_token: int
    max_prompt_chars: int
    max_body_bytes: int

    @classmethod
    def of(cls, tokenizer: ChatGLMTokenizer, max_input_len: int) -> RequestLimits:
        """The limits of an engine taking `max_input_len` tokens with `tokenizer`."""
        chars_per_token = COMPOSED_CHARS * longest_piece_chars(tokenizer)
        body_bytes = OTHER_FIELDS_BYTES + max_input_len * (JSON_BYTES_PER_CHAR * chars_per_token + MESSAGE_JSON_BYTES)
        return cls(max_input_len, chars_per_token, max_input_len * chars_per_token, body_bytes)

    def check_text(self, chars: int, param: str) -> None:
        """Refuses prompt text of `chars` characters that max_input_len tokens cannot hold."""
        if chars > self.max_prompt_chars:
            raise ApiError(400, f"{param} holds {chars} characters, more than the engine's max_input_len "
                                f"{self.max_input_len} tokens can hold ({self.max_prompt_chars}, at most "
                                f"{self.chars_per_token} a token); shorten it", param=param)


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
    field = problems[0]["loc"][:1]
    said = dict.fromkeys(f"{_where(problem['loc']) or 'body'}: {problem['msg']}" for problem in problems
                         if problem["loc"][:1] == field)
    return ApiError(400, "; ".join(said), param=_where(problems[0]["loc"]))


def _where(loc: tuple) -> str | None:
    """A field's path as `messages.0.content`, without the names pydantic gives a union's
    types in it (`prompt.list[int].0`)."""
    return ".".join(str(part) for part in loc if part not in _UNION_TYPES) or None


class Metrics:
    """The Prometheus series of one server (its own registry); the gauges read `engine`'s
    latest stats."""

    def __init__(self, engine: EngineProcess) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("glm_requests", "requests finished, by outcome", ["outcome"], registry=registry)
        self.prompt_tokens = Counter("glm_prompt_tokens", "prompt tokens of admitted requests", registry=registry)
        self.generated_tokens = Counter("glm_generated_tokens", "tokens generated (rate() gives tokens/s)",
                                        registry=registry)
        self.ttft = Histogram("glm_time_to_first_token_seconds", "arrival to first token", registry=registry,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.tpot = Histogram("glm_time_per_output_token_seconds", "first to last token, per later token",
                              registry=registry, buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28))
        for name, text, read in (("glm_requests_running", "sequences in flight", lambda: engine.stats.running),
                                 ("glm_queue_length", "requests waiting for a slot", lambda: engine.stats.waiting),
                                 ("glm_kv_blocks_free", "free blocks of the KV pool",
                                  lambda: engine.stats.free_blocks),
                                 ("glm_kv_blocks_total", "blocks of the KV pool", lambda: engine.stats.total_blocks)):
            Gauge(name, text, registry=registry).set_function(read)

    def record_step(self, request: EngineRequest, new_tokens: int, finished: bool) -> None:
        """The engine's on_step: token counts, and the latencies of a finished request."""
        self.generated_tokens.inc(new_tokens)
        if finished and request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.arrived)
            if request.generated > 1:
                self.tpot.observe((time.monotonic() - request.first_token_at) / (request.generated - 1))


class _Inbox:
    """Hands tokens from the engine's receiving thread to the requests' asyncio queues with
    one wake-up of the event loop per batch (a step's deliveries), not one per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, tuple]] = []

    def put(self, queue: asyncio.Queue, choice: int, tokens: list[int], finished: bool, error: str | None) -> None:
        """A choice's news (its request's deliver), for `queue` on the event loop."""
        with self.lock:
            self.pending.append((queue, (choice, tokens, finished, error)))
            if len(self.pending) > 1:  # a wake-up is already on its way
                return
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            items, self.pending = self.pending, []
        for queue, item in items:
            queue.put_nowait(item)


def create_app(engine: EngineProcess, tokenizer: ChatGLMTokenizer, model_name: str,
               shutdown_timeout: float = 30.0) -> FastAPI:
    """The API over `engine`, naming its one model `model_name`. When the app stops
    (run_server closes the engine earlier), running requests get `shutdown_timeout`
    seconds to finish, then an error."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await asyncio.to_thread(engine.close, shutdown_timeout)

    app = FastAPI(title="glm_engine OpenAI-compatible API", lifespan=lifespan)
    metrics = Metrics(engine)
    engine.on_step = metrics.record_step
    _add_error_handlers(app)
    _add_info_routes(app, engine, metrics, model_name)
    limits = RequestLimits.of(tokenizer, engine.limits.build_config.max_input_len)
    logger.info("requests: bodies up to %d bytes, prompt text up to %d characters", limits.max_body_bytes,
                limits.max_prompt_chars)
    _add_generation_routes(app, _Generations(engine, tokenizer, model_name, metrics, limits))
    return app


def run_server(app: FastAPI, engine: EngineProcess, listener: socket.socket, shutdown_timeout: float,
               log_level: str) -> None:
    """Serves `app` on `listener` (a bound socket) until SIGTERM or SIGINT; then the
    engine closes first (_DrainingServer) and the process returns."""
    level = {"verbose": "debug", "internal_error": "error"}.get(log_level, log_level)  # the tools' names, uvicorn's
    config = uvicorn.Config(app, log_level=level, timeout_graceful_shutdown=CONNECTIONS_CLOSE_SECONDS)
    _DrainingServer(config, engine, shutdown_timeout).run(sockets=[listener])


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, stopping in the order the API promises: the first SIGTERM or
    SIGINT closes the engine (new requests get 503, running ones `shutdown_timeout`
    seconds to finish, then an error), so every handler has its last event; only then
    does uvicorn close the connections. (uvicorn alone cancels the handlers when its own
    timeout passes, before the app closes the engine: an HTTP 500, a stream cut short.)
    A second Ctrl-C stops at once, as uvicorn's does; a second SIGTERM changes nothing."""

    def __init__(self, config: uvicorn.Config, engine: EngineProcess, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout
        self.draining: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler (main thread, inside the event loop): starts the drain; a
        second Ctrl-C makes uvicorn stop without waiting (and raises it again at the end)."""
        if self.draining is not None:
            if sig == signal.SIGINT:
                super().handle_exit(sig, frame)
                self.force_exit = True
            return
        logger.info("%s: closing the engine, running requests get %g s", signal.Signals(sig).name,
                    self.shutdown_timeout)
        self.draining = threading.Thread(target=self._drain, name="drain", daemon=True)
        self.draining.start()

    def _drain(self) -> None:
        self.engine.close(self.shutdown_timeout)
        self.should_exit = True  # uvicorn's loop looks every 0.1 s


def _add_error_handlers(app: FastAPI) -> None:
    """OpenAI's error body for every error: refusals (ApiError's status), Starlette's own
    (an unknown path, a wrong method) and 500 for a fault of the server's."""

    @app.exception_handler(ApiError)
    async def refused(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.kind, error.param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        response = error_response(error.status_code, f"{error.detail}: {request.method} {request.url.path}",
                                  "invalid_request_error" if error.status_code < 500 else "server_error")
        response.headers.update(error.headers or {})  # 405's Allow
        return response

    @app.exception_handler(Exception)
    async def fault(_: Request, error: Exception) -> JSONResponse:
        return error_response(500, f"the server failed: {type(error).__name__}", "server_error")


def _add_info_routes(app: FastAPI, engine: EngineProcess, metrics: Metrics, model_name: str) -> None:
    """/health, /metrics and /v1/models."""

    @app.get("/health")
    async def health() -> JSONResponse:
        stats, alive = engine.stats, engine.alive
        body = {"status": "ok" if alive else "stopped", "requests_running": stats.running,
                "queue_length": stats.waiting, "kv_blocks_free": stats.free_blocks,
                "kv_blocks_total": stats.total_blocks}
        if not alive:
            body["reason"] = engine.stop_reason or "the server is shutting down"
        return JSONResponse(body, 200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "glm_engine",
                                            "created": 0}]}


def _add_generation_routes(app: FastAPI, generations: _Generations) -> None:
    """/v1/completions and /v1/chat/completions."""

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, CompletionRequest, generations.limits.max_body_bytes)
        if isinstance(body.prompt, str):
            text = body.prompt
            prompt = await generations.tokenize(lambda: generations.tokenizer.encode(text), len(text), "prompt")
        else:
            prompt = list(body.prompt)
        return await generations.answer(prompt, body, "text_completion", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request, ChatRequest, generations.limits.max_body_bytes)
        messages = [(message.role, message.content) for message in body.messages]
        prompt = await generations.tokenize(lambda: chat_prompt_ids(generations.tokenizer, messages),
                                            sum(len(content) for _, content in messages), "messages")
        return await generations.answer(prompt, body, "chat.completion", request)


class _Generations:
    """The completions of one server: each request's choices sent to the engine, their
    news gathered into server-sent events or one whole answer, and the choices of a
    client that leaves cancelled (their KV blocks freed before the next step)."""

    def __init__(self, engine: EngineProcess, tokenizer: ChatGLMTokenizer, model_name: str, metrics: Metrics,
                 limits: RequestLimits) -> None:
        self.engine, self.tokenizer, self.model_name, self.metrics = engine, tokenizer, model_name, metrics
        self.limits = limits
        self.inboxes: dict[asyncio.AbstractEventLoop, _Inbox] = {}

    async def tokenize(self, encode: Callable[[], list[int]], chars: int, param: str) -> list[int]:
        """`encode()`'s token ids of a request's `chars` characters of text, on a worker
        thread; text that max_input_len tokens cannot hold is refused untokenized."""
        self.limits.check_text(chars, param)
        try:
            return await asyncio.to_thread(encode)
        except GlmEngineError as error:
            raise ApiError(400, str(error), param=param) from None

    def samplings(self, body: _Generation) -> list[SamplingConfig]:
        """One SamplingConfig per choice (n) of a request; refuses another model's name and
        lengths outside the engine's."""
        if body.model != self.model_name:
            raise ApiError(404, f"model {body.model!r} is not served here; /v1/models lists {self.model_name!r}",
                           param="model")
        build = self.engine.limits.build_config
        max_tokens = build.max_output_len if body.max_tokens is None else body.max_tokens
        if max_tokens > build.max_output_len:
            raise ApiError(400, f"max_tokens {max_tokens} is over the engine's max_output_len {build.max_output_len}",
                           param="max_tokens")
        if body.min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens {body.min_tokens} is over max_tokens {max_tokens}", param="min_tokens")
        stop = _stop_strings(body.stop)
        greedy = body.temperature == 0.0
        return [SamplingConfig(max_new_tokens=max_tokens, temperature=1.0 if greedy else body.temperature,
                               top_k=1 if greedy else 0, top_p=body.top_p, end_id=self.engine.limits.end_id,
                               stop_words=stop,
                               random_seed=None if body.seed is None else (body.seed + choice) % (MAX_SEED + 1),
                               presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                               min_length=body.min_tokens)
                for choice in range(body.n)]

    async def answer(self, prompt: list[int], body: _Generation, kind: str, request: Request):
        """Sends the request's choices to the engine; the streamed events or the whole answer."""
        loop = asyncio.get_running_loop()
        inbox = self.inboxes.get(loop) or self.inboxes.setdefault(loop, _Inbox(loop))
        queue: asyncio.Queue = asyncio.Queue()  # (choice, tokens, finished, error) of all the request's choices
        samplings = self.samplings(body)
        try:
            ids = self.engine.submit([EngineRequest(prompt, sampling, functools.partial(inbox.put, queue, choice))
                                      for choice, sampling in enumerate(samplings)])
        except QueueFull as error:
            raise ApiError(429, str(error), "rate_limit_exceeded") from None
        except EngineClosed as error:
            raise ApiError(503, str(error), "server_error") from None
        except GlmEngineError as error:
            raise ApiError(400, str(error)) from None
        self.metrics.prompt_tokens.inc(len(prompt) * len(ids))
        answer = _Answer(kind, self.model_name, len(prompt), body.n, samplings[0].max_new_tokens, self.tokenizer)
        if body.stream:
            return StreamingResponse(self.events(answer, queue, ids), media_type="text/event-stream")
        return await self.whole_unless_left(request, answer, queue, ids)

    def cancel(self, ids: list[int]) -> None:
        """Drops the requests of choices still open (their client left, or one failed)."""
        for request_id in ids:
            self.engine.cancel(request_id)

    async def news(self, queue: asyncio.Queue, open_choices: set[int]) -> list[tuple]:
        """The request's news (choice, tokens, finished, error) waiting in `queue`, at least
        one, merged per choice: when this side falls behind the engine, several steps' tokens
        go out as one event instead of one event per step. A choice that ends or fails
        leaves `open_choices` and is counted."""
        items = [await queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        merged: dict[int, tuple] = {}
        for choice, tokens, finished, error in items:
            _, before, was_finished, was_error = merged.get(choice, (choice, [], False, None))
            merged[choice] = (choice, before + tokens, was_finished or finished, was_error or error)
        for choice, _, finished, error in merged.values():
            if finished or error is not None:
                open_choices.discard(choice)
                self.metrics.requests.labels("ok" if error is None else "error").inc()
        return list(merged.values())

    async def events(self, answer: _Answer, queue: asyncio.Queue, ids: list[int]) -> AsyncIterator[str]:
        """The request's server-sent events. A client that leaves closes this generator
        (Starlette cancels it, or the next send fails): its open choices are cancelled."""
        open_choices = set(range(len(ids)))
        try:
            while open_choices:
                for choice, tokens, finished, error in await self.news(queue, open_choices):
                    if error is not None:
                        yield _sse({"error": {"message": error, "type": "server_error", "param": None, "code": None}})
                        continue
                    chunk = answer.add(choice, tokens, finished, streaming=True)
                    if chunk is not None:
                        yield _sse(chunk)
            yield _sse(answer.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:  # the client left: free its blocks now
            self.cancel([ids[choice] for choice in open_choices])
            self.metrics.requests.labels("cancelled").inc(len(open_choices))

    async def whole_unless_left(self, request: Request, answer: _Answer, queue: asyncio.Queue,
                                ids: list[int]) -> JSONResponse:
        """The whole answer; a client that disconnects before it is ready is cancelled
        (looked for every DISCONNECT_POLL_SECONDS), its blocks freed."""
        open_choices = set(range(len(ids)))
        whole = asyncio.ensure_future(self.whole(answer, queue, ids, open_choices))
        while not (await asyncio.wait({whole}, timeout=DISCONNECT_POLL_SECONDS))[0]:
            if await request.is_disconnected():
                whole.cancel()  # whole's finally cancels the open choices
                with contextlib.suppress(asyncio.CancelledError):
                    await whole
                self.metrics.requests.labels("cancelled").inc(len(open_choices))
                return error_response(499, "the client closed the connection")  # nobody reads it
        return JSONResponse(whole.result())

    async def whole(self, answer: _Answer, queue: asyncio.Queue, ids: list[int], open_choices: set[int]) -> dict:
        """Every choice's text, once all have finished."""
        try:
            while open_choices:
                for choice, tokens, finished, error in await self.news(queue, open_choices):
                    if error is not None:
                        raise ApiError(503, error, "server_error")
                    answer.add(choice, tokens, finished, streaming=False)
        finally:
            self.cancel([ids[choice] for choice in open_choices])
        return answer.whole()


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
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


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Answer:
    """The response of one request (its n choices), built as tokens arrive: each choice's
    tokens become text once, as they come (IncrementalDetokenizer), for the stream and
    the whole answer alike."""

    def __init__(self, kind: str, model: str, prompt_tokens: int, choices: int, max_tokens: int,
                 tokenizer: ChatGLMTokenizer) -> None:
        self.kind, self.model, self.prompt_tokens = kind, model, prompt_tokens
        self.max_tokens = max_tokens
        self.id = ("chatcmpl-" if kind != "text_completion" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.generated = [0] * choices
        self.texts = [IncrementalDetokenizer(tokenizer) for _ in range(choices)]
        self.finish: list[str | None] = [None] * choices

    def add(self, choice: int, tokens: list[int], finished: bool, streaming: bool) -> dict | None:
        """Takes a step's tokens of a choice; when streaming, the chunk of its new text, if any."""
        self.generated[choice] += len(tokens)
        delta = self.texts[choice].add(tokens)
        if finished:
            delta += self.texts[choice].finish()
            self.finish[choice] = "length" if self.generated[choice] >= self.max_tokens else "stop"
        if not streaming or (not delta and not finished):
            return None
        return self._chunk(choice, delta, self.finish[choice])

    def _chunk(self, choice: int, delta: str, finish: str | None) -> dict:
        if self.kind == "text_completion":
            body = {"index": choice, "text": delta, "logprobs": None, "finish_reason": finish}
            return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                    "choices": [body]}
        body = {"index": choice, "delta": {"role": "assistant", "content": delta}, "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [body]}

    def usage(self) -> dict:
        completion = sum(self.generated)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def usage_chunk(self) -> dict:
        chunk = self._chunk(0, "", None)
        chunk["choices"] = []
        chunk["usage"] = self.usage()
        return chunk

    def whole(self) -> dict:
        texts = [text.text for text in self.texts]
        if self.kind == "text_completion":
            choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": self.finish[i]}
                       for i, text in enumerate(texts)]
        else:
            choices = [{"index": i, "message": {"role": "assistant", "content": text},
                        "finish_reason": self.finish[i]} for i, text in enumerate(texts)]
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}
