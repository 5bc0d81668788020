"""The OpenAI-compatible HTTP API of serve.py, on FastAPI: /v1/completions,
/v1/chat/completions (streamed as server-sent events or whole), /v1/models, /health
and /metrics (Prometheus text). Every request goes to the one engine process
(runtime/engine_process.py), whose loop batches them in flight; a client that disconnects is cancelled (its KV blocks freed before the next step); errors
have OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import asyncio
import contextlib
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
from glm_engine.detokenizer import IncrementalDetokenizer
from glm_engine.prompts import chat_prompt_ids
from glm_engine.runtime.engine_loop import LoopClosed, LoopRequest
from glm_engine.runtime.engine_process import EngineProcess, QueueFull
from glm_engine.config import MAX_SEED
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.tokenizer import ChatGLMTokenizer


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
    """The Prometheus series of one server (its own registry)."""

    def __init__(self, loop_stats) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("glm_requests", "requests finished, by outcome", ["outcome"], registry=registry)
        self.prompt_tokens = Counter("glm_prompt_tokens", "prompt tokens of admitted requests", registry=registry)
        self.generated_tokens = Counter("glm_generated_tokens", "tokens generated (rate() gives tokens/s)",
                                        registry=registry)
        self.ttft = Histogram("glm_time_to_first_token_seconds", "arrival to first token", registry=registry,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.tpot = Histogram("glm_time_per_output_token_seconds", "first to last token, per later token",
                              registry=registry, buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28))
        for name, text, read in (("glm_requests_running", "sequences in flight", lambda: loop_stats.running),
                                 ("glm_queue_length", "requests waiting for a slot", lambda: loop_stats.waiting),
                                 ("glm_kv_blocks_free", "free blocks of the KV pool", lambda: loop_stats.free_blocks),
                                 ("glm_kv_blocks_total", "blocks of the KV pool", lambda: loop_stats.total_blocks)):
            Gauge(name, text, registry=registry).set_function(read)

    def record_step(self, request: LoopRequest, new_tokens: int, finished: bool) -> None:
        """The engine's on_step: token counts, and the latencies of a finished request."""
        self.generated_tokens.inc(new_tokens)
        if finished and request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.arrived)
            if request.generated > 1:
                self.tpot.observe((time.monotonic() - request.first_token_at) / (request.generated - 1))


class _Inbox:
    """Hands tokens from the engine loop's thread to the requests' asyncio queues with one
    wake-up of the event loop per batch (a step's deliveries), not one per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, tuple]] = []

    def put(self, queue: asyncio.Queue, item: tuple) -> None:
        with self.lock:
            self.pending.append((queue, item))
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
    metrics = Metrics(engine.stats)
    engine.on_step = metrics.record_step
    build, end_id = engine.limits.build_config, engine.limits.end_id

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return error_response(400, f"{where or 'body'}: {first.get('msg')}", param=where)

    @app.exception_handler(ApiError)
    async def refused(_: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.kind, error.param)

    @app.get("/health")
    async def health() -> JSONResponse:
        stats, alive = engine.stats, engine.alive
        return JSONResponse({"status": "ok" if alive else "stopped", "requests_running": stats.running,
                             "queue_length": stats.waiting, "kv_blocks_free": stats.free_blocks,
                             "kv_blocks_total": stats.total_blocks}, 200 if alive else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "glm_engine",
                                            "created": 0}]}

    def samplings(body: _Generation) -> list[SamplingConfig]:
        if body.model != model_name:
            raise ApiError(404, f"model {body.model!r} is not served here; /v1/models lists {model_name!r}",
                           param="model")
        max_tokens = build.max_output_len if body.max_tokens is None else body.max_tokens
        if max_tokens > build.max_output_len:
            raise ApiError(400, f"max_tokens {max_tokens} is over the engine's max_output_len {build.max_output_len}",
                           param="max_tokens")
        if body.min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens {body.min_tokens} is over max_tokens {max_tokens}", param="min_tokens")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        greedy = body.temperature == 0.0
        return [SamplingConfig(max_new_tokens=max_tokens, temperature=1.0 if greedy else body.temperature,
                               top_k=1 if greedy else 0, top_p=body.top_p, end_id=end_id, stop_words=stop,
                               random_seed=None if body.seed is None else (body.seed + choice) % (MAX_SEED + 1),
                               presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                               min_length=body.min_tokens)
                for choice in range(body.n)]

    inboxes: dict[asyncio.AbstractEventLoop, _Inbox] = {}

    async def run(prompt: list[int], body: _Generation, kind: str, request: Request):
        loop = asyncio.get_running_loop()
        inbox = inboxes.get(loop) or inboxes.setdefault(loop, _Inbox(loop))
        queue: asyncio.Queue = asyncio.Queue()  # (choice, tokens, finished, error) of all the request's choices
        ids: list[int] = []
        try:
            for choice, sampling in enumerate(samplings(body)):
                deliver = lambda tokens, finished, error, choice=choice: inbox.put(  # noqa: E731
                    queue, (choice, tokens, finished, error))
                ids.append(engine.submit(LoopRequest(prompt, sampling, deliver)))
        except QueueFull as error:
            _cancel(ids)
            raise ApiError(429, str(error), "rate_limit_exceeded") from None
        except LoopClosed as error:
            _cancel(ids)
            raise ApiError(503, str(error), "server_error") from None
        except GlmEngineError as error:
            _cancel(ids)
            raise ApiError(400, str(error)) from None
        metrics.prompt_tokens.inc(len(prompt) * len(ids))
        answer = _Answer(kind, model_name, len(prompt), body.n, sampling.max_new_tokens, tokenizer)
        if body.stream:
            return StreamingResponse(_events(answer, queue, ids), media_type="text/event-stream")
        return await _whole_unless_left(request, answer, queue, ids)

    def _cancel(ids: list[int]) -> None:
        for request_id in ids:
            engine.cancel(request_id)

    async def _news(queue: asyncio.Queue, open_choices: set[int]) -> list[tuple]:
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
                metrics.requests.labels("ok" if error is None else "error").inc()
        return list(merged.values())

    async def _events(answer: _Answer, queue: asyncio.Queue, ids: list[int]) -> AsyncIterator[str]:
        """The request's server-sent events. A client that leaves closes this generator
        (Starlette cancels it, or the next send fails): its open choices are cancelled."""
        open_choices = set(range(len(ids)))
        try:
            while open_choices:
                for choice, tokens, finished, error in await _news(queue, open_choices):
                    if error is not None:
                        yield _sse({"error": {"message": error, "type": "server_error", "param": None, "code": None}})
                        continue
                    chunk = answer.add(choice, tokens, finished, streaming=True)
                    if chunk is not None:
                        yield _sse(chunk)
            yield _sse(answer.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:  # the client left: free its blocks now
            _cancel([ids[choice] for choice in open_choices])
            metrics.requests.labels("cancelled").inc(len(open_choices))

    async def _whole_unless_left(request: Request, answer: _Answer, queue: asyncio.Queue,
                                 ids: list[int]) -> JSONResponse:
        """The whole answer; a client that disconnects before it is ready is cancelled
        (looked for every DISCONNECT_POLL_SECONDS), its blocks freed."""
        open_choices = set(range(len(ids)))
        whole = asyncio.ensure_future(_whole(answer, queue, ids, open_choices))
        while not (await asyncio.wait({whole}, timeout=DISCONNECT_POLL_SECONDS))[0]:
            if await request.is_disconnected():
                whole.cancel()  # _whole's finally cancels the open choices
                with contextlib.suppress(asyncio.CancelledError):
                    await whole
                metrics.requests.labels("cancelled").inc(len(open_choices))
                return error_response(499, "the client closed the connection")  # nobody reads it
        return JSONResponse(whole.result())

    async def _whole(answer: _Answer, queue: asyncio.Queue, ids: list[int], open_choices: set[int]) -> dict:
        try:
            while open_choices:
                for choice, tokens, finished, error in await _news(queue, open_choices):
                    if error is not None:
                        raise ApiError(503, error, "server_error")
                    answer.add(choice, tokens, finished, streaming=False)
        finally:
            _cancel([ids[choice] for choice in open_choices])
        return answer.whole()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else list(body.prompt)
        return await run(prompt, body, "text_completion", request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        try:
            prompt = chat_prompt_ids(tokenizer, [(message.role, message.content) for message in body.messages])
        except GlmEngineError as error:
            raise ApiError(400, str(error), param="messages") from None
        return await run(prompt, body, "chat.completion", request)

    return app


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
