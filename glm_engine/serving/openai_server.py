"""The OpenAI-compatible HTTP API of serve.py, on FastAPI: /v1/completions,
/v1/chat/completions (streamed as server-sent events or whole), /v1/models, /health
and /metrics (Prometheus text). Every request goes to the one engine process
(serving/engine_process.py), whose loop batches them in flight; a client that
disconnects is cancelled (its KV blocks freed before the next step); errors have
OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from glm_engine import GlmEngineError
from glm_engine.text.detokenizer import IncrementalDetokenizer
from glm_engine.text.prompts import chat_prompt_ids
from glm_engine.serving.engine_process import EngineClosed, EngineProcess, EngineRequest, QueueFull
from glm_engine.config import MAX_SEED
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.text.tokenizer import ChatGLMTokenizer


DISCONNECT_POLL_SECONDS = 0.5  # how often a whole (not streamed) answer's client is checked


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field we do not implement is an error, never ignored


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


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


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
    """The API over `engine`, naming its one model `model_name`. When the server
    stops, running requests get `shutdown_timeout` seconds to finish, then an error."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await asyncio.to_thread(engine.close, shutdown_timeout)

    app = FastAPI(title="glm_engine OpenAI-compatible API", lifespan=lifespan)
    metrics = Metrics(engine)
    engine.on_step = metrics.record_step
    _add_error_handlers(app)
    _add_info_routes(app, engine, metrics, model_name)
    _add_generation_routes(app, _Generations(engine, tokenizer, model_name, metrics))
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """OpenAI's error body for invalid requests (400) and refusals (ApiError's status)."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return error_response(400, f"{where or 'body'}: {first.get('msg')}", param=where)

    @app.exception_handler(ApiError)
    async def refused(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.kind, error.param)


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
    async def completions(body: CompletionRequest, request: Request):
        tokenizer = generations.tokenizer
        prompt = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        return await generations.answer(prompt, body, "text_completion", request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        messages = [(message.role, message.content) for message in body.messages]
        try:
            prompt = chat_prompt_ids(generations.tokenizer, messages)
        except GlmEngineError as error:
            raise ApiError(400, str(error), param="messages") from None
        return await generations.answer(prompt, body, "chat.completion", request)


class _Generations:
    """The completions of one server: each request's choices sent to the engine, their
    news gathered into server-sent events or one whole answer, and the choices of a
    client that leaves cancelled (their KV blocks freed before the next step)."""

    def __init__(self, engine: EngineProcess, tokenizer: ChatGLMTokenizer, model_name: str, metrics: Metrics) -> None:
        self.engine, self.tokenizer, self.model_name, self.metrics = engine, tokenizer, model_name, metrics
        self.inboxes: dict[asyncio.AbstractEventLoop, _Inbox] = {}

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
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
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
