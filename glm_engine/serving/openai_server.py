"""The OpenAI-compatible HTTP API of serve.py, on FastAPI: /v1/completions,
/v1/chat/completions (streamed as server-sent events or whole), /v1/models, vLLM's
/tokenize and /detokenize, /health and /metrics (Prometheus text). Every request goes
to the one engine process (serving/engine_process.py), whose loop batches them in
flight; a client that disconnects is cancelled (its KV blocks freed before the next
step); errors have OpenAI's body: {"error": {"message", "type", "param", "code"}}.
The request bodies and their sampling fields are serving/protocol.py's.

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

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from glm_engine import GlmEngineError
from glm_engine.serving.engine_loop import TokenLogProb
from glm_engine.serving.engine_process import EngineClosed, EngineProcess, EngineRequest, QueueFull
from glm_engine.serving.protocol import (MAX_STOP_CHARS, MAX_STOP_STRINGS, ApiError, ChatRequest,  # noqa: F401
                                         CompletionRequest, DetokenizeRequest, TokenizeRequest, _Generation,
                                         check_no_tools, error_response, read_body, samplings)
from glm_engine.serving.tool_calls import chat_turns, message_turns, read_call
from glm_engine.text.detokenizer import IncrementalDetokenizer
from glm_engine.text.prompts import chat_prompt_ids
from glm_engine.text.tokenizer import ChatGLMTokenizer


logger = logging.getLogger("openai_server")

DISCONNECT_POLL_SECONDS = 0.5  # how often a whole (not streamed) answer's client is checked
COMPOSED_CHARS = 4  # code points Unicode normalization (NFKC) may compose into one: a Greek vowel and 3 marks
JSON_BYTES_PER_CHAR = 12  # the most one character takes in JSON: a pair of \uXXXX escapes
MESSAGE_JSON_BYTES = 64  # a chat message's JSON around its content (each message adds a token at least)
OTHER_FIELDS_BYTES = 64 * 1024  # the body's other fields, stop strings included
CONNECTIONS_CLOSE_SECONDS = 5.0  # once the engine is closed, for the last events to reach their clients
LOWEST_LOG_PROB = -9999.0  # what a log-prob of -inf (a token the request's filters exclude) shows as, as vLLM's


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
        chars_per_token = COMPOSED_CHARS * tokenizer.max_token_chars()
        body_bytes = OTHER_FIELDS_BYTES + max_input_len * (JSON_BYTES_PER_CHAR * chars_per_token + MESSAGE_JSON_BYTES)
        return cls(max_input_len, chars_per_token, max_input_len * chars_per_token, body_bytes)

    def check_text(self, chars: int, param: str) -> None:
        """Refuses prompt text of `chars` characters that max_input_len tokens cannot hold."""
        if chars > self.max_prompt_chars:
            raise ApiError(400, f"{param} holds {chars} characters, more than the engine's max_input_len "
                                f"{self.max_input_len} tokens can hold ({self.max_prompt_chars}, at most "
                                f"{self.chars_per_token} a token); shorten it", param=param)


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
                                 ("glm_kv_blocks_total", "blocks of the KV pool", lambda: engine.stats.total_blocks),
                                 ("glm_prefix_cache_queried_tokens", "prompt tokens looked up in the prefix cache",
                                  lambda: engine.prefix_cache.queried_tokens),
                                 ("glm_prefix_cache_hit_tokens", "prompt tokens found in the prefix cache",
                                  lambda: engine.prefix_cache.hit_tokens),
                                 ("glm_prefix_cache_hit_rate", "hit tokens / queried tokens (0 before any)",
                                  lambda: engine.prefix_cache.hit_rate),
                                 ("glm_prefix_cache_evicted_blocks", "cached blocks handed out for new content",
                                  lambda: engine.prefix_cache.evicted_blocks),
                                 ("glm_prefix_cache_cached_blocks", "blocks held under their content now",
                                  lambda: engine.prefix_cache.cached_blocks),
                                 *self._speculative_gauges(engine)):
            Gauge(name, text, registry=registry).set_function(read)

    @staticmethod
    def _speculative_gauges(engine) -> list[tuple]:
        """Speculative decoding's counts (0 with it off): Scheduler.speculative_counts'."""
        return [(f"glm_speculative_{name}", text, lambda name=name: engine.speculative.get(name, 0))
                for name, text in (("drafted_tokens", "draft tokens verified"),
                                   ("accepted_tokens", "draft tokens accepted"),
                                   ("acceptance", "accepted / drafted tokens (0 before any)"),
                                   ("verify_steps", "forward steps that verified drafts"),
                                   ("forward_steps_per_token", "forward steps per generated token"))]

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

    def put(self, queue: asyncio.Queue, choice: int, tokens: list[int], finished: bool, error: str | None,
            log_probs: list[TokenLogProb] | None) -> None:
        """A choice's news (its request's deliver), for `queue` on the event loop."""
        with self.lock:
            self.pending.append((queue, (choice, tokens, finished, error, log_probs)))
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
    generations = _Generations(engine, tokenizer, model_name, metrics, limits)
    _add_generation_routes(app, generations)
    _add_token_routes(app, generations)
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
        prompts, texts = await generations.completion_prompts(body.prompt)
        if body.echo and body.logprobs is not None:
            raise ApiError(400, "echo with logprobs would need the prompt's log-probs, which the engine does not "
                                "compute; drop one of them", param="echo")
        return await generations.answer(prompts, body, "text_completion", request, texts if body.echo else None)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request, ChatRequest, generations.limits.max_body_bytes)
        check_no_tools(body)
        turns, tool_format, tool_names = chat_turns(body, generations.tokenizer.flavor)
        return await generations.answer([await generations.chat_prompt(turns)], body, "chat.completion", request,
                                        tool_format=tool_format, tool_names=tool_names)


def _add_token_routes(app: FastAPI, generations: _Generations) -> None:
    """vLLM's /tokenize and /detokenize."""

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await read_body(request, TokenizeRequest, generations.limits.max_body_bytes)
        generations.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "send either prompt (text) or messages (a chat)", param="prompt")
        if body.messages is not None:
            if body.add_special_tokens is not None:
                raise ApiError(400, "add_special_tokens applies to a prompt; a chat is formatted as "
                                    "/v1/chat/completions formats it", param="add_special_tokens")
            tokens = await generations.chat_prompt(message_turns(body.messages))
        else:
            prefix, text = body.add_special_tokens is not False, body.prompt
            tokens = await generations.tokenize(lambda: generations.tokenizer.encode(text, add_prefix=prefix),
                                                len(text), "prompt")
        build = generations.engine.limits.build_config
        return {"tokens": tokens, "count": len(tokens), "max_model_len": build.max_input_len + build.max_output_len,
                "max_input_len": build.max_input_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await read_body(request, DetokenizeRequest, generations.limits.max_body_bytes)
        generations.check_model(body.model)
        vocab = generations.engine.limits.vocab_size
        bad = [token for token in body.tokens if not 0 <= token < vocab]
        if bad:
            raise ApiError(400, f"tokens holds token id {bad[0]}, outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": await asyncio.to_thread(generations.tokenizer.decode, body.tokens)}


class _Generations:
    """The completions of one server: each request's choices sent to the engine, their
    news gathered into server-sent events or one whole answer, and the choices of a
    client that leaves cancelled (their KV blocks freed before the next step)."""

    def __init__(self, engine: EngineProcess, tokenizer: ChatGLMTokenizer, model_name: str, metrics: Metrics,
                 limits: RequestLimits) -> None:
        self.engine, self.tokenizer, self.model_name, self.metrics = engine, tokenizer, model_name, metrics
        self.limits = limits
        self.token_texts = TokenTexts(tokenizer)
        self.inboxes: dict[asyncio.AbstractEventLoop, _Inbox] = {}

    def check_model(self, model: str | None) -> None:
        """Refuses another model's name (None: a field that may be left out was)."""
        if model is not None and model != self.model_name:
            raise ApiError(404, f"model {model!r} is not served here; /v1/models lists {self.model_name!r}",
                           param="model")

    async def tokenize(self, encode: Callable[[], list[int]], chars: int, param: str) -> list[int]:
        """`encode()`'s token ids of a request's `chars` characters of text, on a worker
        thread; text that max_input_len tokens cannot hold is refused untokenized."""
        self.limits.check_text(chars, param)
        try:
            return await asyncio.to_thread(encode)
        except GlmEngineError as error:
            raise ApiError(400, str(error), param=param) from None

    async def completion_prompts(self, prompt: str | list) -> tuple[list[list[int]], list[str]]:
        """The token ids and text of each prompt of /v1/completions: a string, a list of
        strings, a token list or a list of token lists."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt is an empty list; send a prompt", param="prompt")
        ids, texts = [], []
        for index, one in enumerate(prompt):
            if isinstance(one, str):
                ids.append(await self.tokenize(functools.partial(self.tokenizer.encode, one), len(one),
                                               "prompt" if len(prompt) == 1 else f"prompt.{index}"))
                texts.append(one)
            else:
                ids.append(list(one))
                texts.append(self.tokenizer.decode(one))
        return ids, texts

    async def chat_prompt(self, turns: list[tuple[str, ...]]) -> list[int]:
        """The token ids of a chat's (role, content[, metadata]) turns, in the model's chat format."""
        return await self.tokenize(lambda: chat_prompt_ids(self.tokenizer, turns),
                                   sum(len(text) for _, text, *_ in turns), "messages")

    async def answer(self, prompts: list[list[int]], body: _Generation, kind: str, request: Request,
                     echo: list[str] | None = None, tool_format: dict | None = None,
                     tool_names: list[str] | None = None):
        """Sends each prompt's choices to the engine (choice index: prompt index * n + its
        choice, as OpenAI's); the streamed events or the whole answer. `tool_format`: the
        grammar of a required function call; `tool_names`: the functions an answer may call."""
        self.check_model(body.model)
        loop = asyncio.get_running_loop()
        inbox = self.inboxes.get(loop) or self.inboxes.setdefault(loop, _Inbox(loop))
        queue: asyncio.Queue = asyncio.Queue()  # (choice, tokens, finished, error, log-probs) of all its choices
        configs = samplings(body, self.engine.limits, tool_format)
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options applies to streamed answers; set stream true", param="stream_options")
        requests = [(prompt, sampling) for prompt in prompts for sampling in configs]
        try:
            ids = self.engine.submit([EngineRequest(prompt, sampling, functools.partial(inbox.put, queue, choice))
                                      for choice, (prompt, sampling) in enumerate(requests)])
        except QueueFull as error:
            raise ApiError(429, str(error), "rate_limit_exceeded") from None
        except EngineClosed as error:
            raise ApiError(503, str(error), "server_error") from None
        except GlmEngineError as error:
            raise ApiError(400, str(error)) from None
        self.metrics.prompt_tokens.inc(sum(len(prompt) for prompt, _ in requests))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        answer = _Answer(kind, self.model_name, sum(map(len, prompts)), len(requests), configs[0].max_new_tokens,
                         self.tokenizer, echo=[text for text in echo for _ in configs] if echo else None,
                         token_texts=self.token_texts if configs[0].output_log_probs else None,
                         include_usage=include_usage, tool_names=tool_names)
        if body.stream:
            return StreamingResponse(self.events(answer, queue, ids), media_type="text/event-stream")
        return await self.whole_unless_left(request, answer, queue, ids)

    def cancel(self, ids: list[int]) -> None:
        """Drops the requests of choices still open (their client left, or one failed)."""
        for request_id in ids:
            self.engine.cancel(request_id)

    async def news(self, queue: asyncio.Queue, open_choices: set[int]) -> list[tuple]:
        """The request's news (choice, tokens, finished, error, log-probs) waiting in
        `queue`, at least one, merged per choice: when this side falls behind the engine,
        several steps' tokens go out as one event instead of one event per step. A choice
        that ends or fails leaves `open_choices` and is counted."""
        items = [await queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        merged: dict[int, tuple] = {}
        for choice, tokens, finished, error, log_probs in items:
            _, before, was_finished, was_error, logged = merged.get(choice, (choice, [], False, None, []))
            merged[choice] = (choice, before + tokens, was_finished or finished, was_error or error,
                              logged + (log_probs or []))
        for choice, _, finished, error, _ in merged.values():
            if finished or error is not None:
                open_choices.discard(choice)
                self.metrics.requests.labels("ok" if error is None else "error").inc()
        return list(merged.values())

    async def events(self, answer: _Answer, queue: asyncio.Queue, ids: list[int]) -> AsyncIterator[str]:
        """The request's server-sent events, the usage last when asked (include_usage). A
        client that leaves closes this generator (Starlette cancels it, or the next send
        fails): its open choices are cancelled."""
        open_choices = set(range(len(ids)))
        try:
            while open_choices:
                for choice, tokens, finished, error, log_probs in await self.news(queue, open_choices):
                    if error is not None:
                        yield _sse({"error": {"message": error, "type": "server_error", "param": None, "code": None}})
                        continue
                    chunk = answer.add(choice, tokens, finished, streaming=True, log_probs=log_probs)
                    if chunk is not None:
                        yield _sse(chunk)
            if answer.include_usage:
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
                for choice, tokens, finished, error, log_probs in await self.news(queue, open_choices):
                    if error is not None:
                        raise ApiError(503, error, "server_error")
                    answer.add(choice, tokens, finished, streaming=False, log_probs=log_probs)
        finally:
            self.cancel([ids[choice] for choice in open_choices])
        return answer.whole()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class TokenTexts:
    """How tokens show in log-probs: a token's text (its SentencePiece piece, "▁" as a
    space; a byte piece that is not a whole character as vLLM's "bytes:\\xe5"; a special
    token its name), and its UTF-8 bytes (None for a special token)."""

    def __init__(self, tokenizer: ChatGLMTokenizer) -> None:
        self.pieces = tokenizer.token_bytes()

    def text(self, token: int) -> str:
        """The token's text."""
        if not 0 <= token < len(self.pieces):
            return "⁇"  # outside the tokenizer (an engine vocabulary larger than it): decode()'s mark
        piece = self.pieces[token]
        if piece.startswith(b"\xff"):
            return piece[1:].decode()
        try:
            return piece.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in piece)

    def bytes(self, token: int) -> list[int] | None:
        """The token's bytes in a text."""
        if not 0 <= token < len(self.pieces) or self.pieces[token].startswith(b"\xff"):
            return None
        return list(self.pieces[token])


def _finite(log_prob: float) -> float:
    return max(log_prob, LOWEST_LOG_PROB)  # JSON has no -inf


class _Answer:
    """The response of one request (its choices), built as tokens arrive: each choice's
    tokens become text once, as they come (IncrementalDetokenizer), for the stream and
    the whole answer alike. With `echo`, each choice's text starts with its prompt's; with
    `token_texts`, choices carry their tokens' log-probs in the endpoint's shape; with
    `include_usage`, the stream ends with a chunk of the usage and no choices. With
    `tool_names`, a choice whose text is a call of one of them (serving/tool_calls.py)
    answers with that call; streamed, its text is held until it is known to be plain."""

    def __init__(self, kind: str, model: str, prompt_tokens: int, choices: int, max_tokens: int,
                 tokenizer: ChatGLMTokenizer, echo: list[str] | None = None, token_texts: TokenTexts | None = None,
                 include_usage: bool = False, tool_names: list[str] | None = None) -> None:
        self.kind, self.model, self.prompt_tokens = kind, model, prompt_tokens
        self.max_tokens = max_tokens
        self.id = ("chatcmpl-" if kind != "text_completion" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.generated = [0] * choices
        self.texts = [IncrementalDetokenizer(tokenizer) for _ in range(choices)]
        self.finish: list[str | None] = [None] * choices
        self.echo = echo or [""] * choices
        self.echoed = [False] * choices  # streaming: whether the choice's echo went out
        self.token_texts, self.include_usage = token_texts, include_usage
        self.logged: list[list[dict]] = [[] for _ in range(choices)]  # log-prob parts of whole answers
        self.tool_names = tool_names
        self.held = [tool_names is not None] * choices  # streaming: text held, as it may be a call

    def add(self, choice: int, tokens: list[int], finished: bool, streaming: bool,
            log_probs: list[TokenLogProb] | None = None) -> dict | None:
        """Takes a step's tokens of a choice (and their log-probs, when asked); when
        streaming, the chunk of its new text, if any."""
        first = self.generated[choice]
        self.generated[choice] += len(tokens)
        delta = self.texts[choice].add(tokens)
        if finished:
            delta += self.texts[choice].finish()
            self.finish[choice] = "length" if self.generated[choice] >= self.max_tokens else "stop"
        logged = self._log_probs(choice, first, tokens, log_probs or []) if self.token_texts and tokens else None
        if not streaming:
            if logged is not None:
                self.logged[choice].append(logged)
            return None
        if self.held[choice]:
            return self._held(choice, finished)
        if not self.echoed[choice]:
            delta, self.echoed[choice] = self.echo[choice] + delta, True
        if not delta and not finished and logged is None:
            return None
        return self._chunk(choice, delta, self.finish[choice], logged)

    def _held(self, choice: int, finished: bool) -> dict | None:
        """The chunk of a choice whose text may be a function call: nothing until its text
        shows a plain answer (all of it then) or ends (its call, or its text)."""
        text = self.texts[choice].text
        call = read_call(text, self.tool_names) if finished else None
        if call is not None:
            self.finish[choice] = "tool_calls"
            return self._chunk(choice, None, "tool_calls", None, [{"index": 0, **call}])
        if not (finished or text.startswith("\n")):  # GLM-4's plain answers open with a newline
            return None
        self.held[choice] = False
        return self._chunk(choice, text, self.finish[choice], None)

    def _log_probs(self, choice: int, first: int, tokens: list[int], log_probs: list[TokenLogProb]) -> dict:
        """The log-probs of a choice's `tokens` (its first-th on), in the endpoint's shape."""
        texts = self.token_texts
        if self.kind != "text_completion":
            content = [{"token": texts.text(token), "logprob": _finite(value), "bytes": texts.bytes(token),
                        "top_logprobs": [{"token": texts.text(other), "logprob": _finite(other_value),
                                          "bytes": texts.bytes(other)} for other, other_value in top]}
                       for token, (value, top) in zip(tokens, log_probs)]
            return {"content": content, "refusal": None}
        detokenizer, echo = self.texts[choice], len(self.echo[choice])
        ends = detokenizer.ends  # where each released token's text ends; one not released starts at the end
        starts = [ends[index - 1] if 0 < index <= len(ends) else (0 if index == 0 else detokenizer.length)
                  for index in range(first, first + len(tokens))]
        return {"tokens": [texts.text(token) for token in tokens],
                "token_logprobs": [_finite(value) for value, _ in log_probs],
                "top_logprobs": [{texts.text(token): _finite(value),
                                  **{texts.text(other): _finite(other_value) for other, other_value in top}}
                                 for token, (value, top) in zip(tokens, log_probs)],
                "text_offset": [echo + start for start in starts]}

    def _chunk(self, choice: int, delta: str | None, finish: str | None, logged: dict | None,
               tool_calls: list[dict] | None = None) -> dict:
        if self.kind == "text_completion":
            body = {"index": choice, "text": delta, "logprobs": logged, "finish_reason": finish}
            return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                    "choices": [body]}
        message = {"role": "assistant", "content": delta, **({"tool_calls": tool_calls} if tool_calls else {})}
        body = {"index": choice, "delta": message, "logprobs": logged, "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [body]}

    def usage(self) -> dict:
        completion = sum(self.generated)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def usage_chunk(self) -> dict:
        """OpenAI's last chunk of a stream asking include_usage: no choices, the usage."""
        chunk = self._chunk(0, "", None, None)
        chunk["choices"] = []
        chunk["usage"] = self.usage()
        return chunk

    def _whole_log_probs(self, choice: int) -> dict | None:
        parts = self.logged[choice]
        if self.token_texts is None:
            return None
        if self.kind != "text_completion":
            return {"content": [entry for part in parts for entry in part["content"]], "refusal": None}
        keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        return {key: [value for part in parts for value in part[key]] for key in keys}

    def _whole_message(self, choice: int, text: str) -> dict:
        """A chat choice of the whole answer: its text, or the function call it holds."""
        call = read_call(text, self.tool_names) if self.tool_names is not None else None
        message = {"role": "assistant", "content": text} if call is None else \
            {"role": "assistant", "content": None, "tool_calls": [call]}
        return {"index": choice, "message": message, "logprobs": self._whole_log_probs(choice),
                "finish_reason": self.finish[choice] if call is None else "tool_calls"}

    def whole(self) -> dict:
        """The whole answer: every choice's text (after its echo), finish reason and log-probs, and the usage."""
        texts = [echo + text.text for echo, text in zip(self.echo, self.texts)]
        if self.kind == "text_completion":
            choices = [{"index": i, "text": text, "logprobs": self._whole_log_probs(i),
                        "finish_reason": self.finish[i]} for i, text in enumerate(texts)]
        else:
            choices = [self._whole_message(i, text) for i, text in enumerate(texts)]
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}
