"""serve.py's engine in a process of its own. The HTTP side (parsing, tokenizing,
detokenizing, server-sent events) and the engine loop each get an interpreter, so the
engine's steps never wait on the HTTP side's Python for the GIL (sharing one process,
the server ran at 0.54x the engine's in-process throughput).

EngineProcess, in the server's process, is what the HTTP side calls (submit, cancel,
close, alive, stats, on_step for metrics); it checks each request against the engine's
limits and the queue limit before it sends it. One pipe carries commands to the engine
process; the other carries, once per engine step, every request's news and the loop's
stats."""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from glm_engine import GlmEngineError
from glm_engine.config import BuildConfig
from glm_engine.runtime.engine_loop import EngineLoop, LoopClosed, LoopRequest, LoopStats
from glm_engine.runtime.session import Session, check_prompt

logger = logging.getLogger("engine_process")

POLL_SECONDS = 0.5  # how often the engine process looks whether its loop has stopped


class QueueFull(GlmEngineError):
    """More requests wait than the server's queue limit."""


@dataclass(frozen=True)
class EngineLimits:
    """What the server checks a request against without asking the engine process."""

    build_config: BuildConfig
    vocab_size: int
    end_id: int
    num_blocks: int
    block_size: int

    def check(self, prompt: list[int], max_new_tokens: int) -> None:
        """Raises GlmEngineError for a request the engine can never hold."""
        check_prompt(self.build_config, self.vocab_size, 0, prompt, max_new_tokens)
        tokens = len(prompt) + max_new_tokens
        if -(-tokens // self.block_size) > self.num_blocks:
            raise GlmEngineError(f"the prompt and max_tokens need {tokens} tokens of KV cache, more than the "
                                 f"engine's pool of {self.num_blocks * self.block_size}")


class EngineProcess:
    """Starts the engine process (a session from `session_factory`, run by an EngineLoop)
    and talks to it; requests are submitted, cancelled and closed from any thread."""

    def __init__(self, session_factory: Callable[[], Session], scheduler_options: dict | None = None,
                 max_queue: int = 1024, on_step: Callable[[LoopRequest, int, bool], None] | None = None,
                 process_setup: Callable[[], None] | None = None) -> None:
        """`session_factory` runs in the new process, after `process_setup` (logging); both
        must pickle (module-level functions or functools.partials of them). The loop runs
        the session's new_scheduler(**scheduler_options). Returns once the engine is loaded;
        raises GlmEngineError with the engine process's message if it could not start."""
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._commands, child_commands = context.Pipe(duplex=False)[::-1]
        events, self._child_events = context.Pipe(duplex=False)
        self.process = context.Process(target=_engine_main, name="glm-engine",
                                       args=(session_factory, scheduler_options or {}, process_setup,
                                             child_commands, self._child_events))
        self.process.start()
        child_commands.close()
        self._child_events.close()
        self._events = events
        self.limits = self._wait_ready()
        self.max_queue = max_queue
        self.on_step = on_step
        self.stats = LoopStats(total_blocks=self.limits.num_blocks, free_blocks=self.limits.num_blocks)
        self._send_lock = threading.Lock()
        self._active: dict[int, LoopRequest] = {}
        self._submitted = 0  # requests sent; the engine process counts those it has taken
        self._taken = 0
        self._closing = False
        self._engine_alive = True
        self._receiver = threading.Thread(target=self._receive, name="engine-events", daemon=True)
        self._receiver.start()

    def _wait_ready(self) -> EngineLimits:
        try:
            message = self._events.recv()
        except EOFError:
            self.process.join()
            raise GlmEngineError(f"the engine process exited while starting (exit code {self.process.exitcode})") \
                from None
        if message[0] == "failed":
            self.process.join()
            raise GlmEngineError(message[1])
        return message[1]

    @property
    def alive(self) -> bool:
        """Whether the engine still takes requests (False once closing, or after a failure)."""
        return self._engine_alive and not self._closing and self.process.is_alive()

    def submit(self, request: LoopRequest) -> int:
        """Sends a request to the engine; returns its id. Refuses one the engine can never
        hold (GlmEngineError), one past the queue limit (QueueFull), any once closing (LoopClosed)."""
        self.limits.check(request.prompt, request.sampling.max_new_tokens)
        with self._send_lock:
            if not self.alive:
                raise LoopClosed("the server is shutting down" if self._closing else "the engine has stopped")
            # Requests not yet taken by the engine process count as waiting.
            if self.stats.waiting + self._submitted - self._taken >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting; retry later")
            request_id = self._submitted
            try:
                self._commands.send(("submit", request_id, request.prompt, request.sampling))
            except OSError:  # it died a moment ago (BrokenPipeError); the receiver is finding out
                raise LoopClosed("the engine has stopped") from None
            self._submitted += 1
            self._active[request_id] = request
        return request_id

    def cancel(self, request_id: int) -> None:
        """Drops a request (its client left): its blocks are freed before the next step."""
        with self._send_lock:
            if self._active.pop(request_id, None) is not None and self._engine_alive:
                with contextlib.suppress(OSError):  # a dead engine holds no blocks
                    self._commands.send(("cancel", request_id))

    def close(self, timeout: float) -> None:
        """Refuses new requests, lets running and queued ones finish for up to `timeout`
        seconds, then ends the rest with an error; returns once the engine process exited."""
        with self._send_lock:
            self._closing = True
            if self._engine_alive:
                with contextlib.suppress(OSError):
                    self._commands.send(("close", timeout))
        self._receiver.join()
        self.process.join(timeout + 30)
        if self.process.is_alive():
            logger.warning("the engine process did not exit; killing it")
            self.process.kill()
            self.process.join()

    def _receive(self) -> None:
        """Hands each step's news to the requests (on this thread) until the engine process ends."""
        message = "the engine process stopped"
        try:
            while True:
                kind, *payload = self._events.recv()
                if kind != "step":
                    message = payload[0]
                    break
                self._deliver(*payload)
        except (EOFError, OSError):
            message = f"the engine process exited unexpectedly (exit code {self.process.exitcode})"
        with self._send_lock:
            self._engine_alive = False
            orphans, self._active = list(self._active.values()), {}
        if orphans:
            logger.error("%s; ending %d requests", message, len(orphans))
        for request in orphans:
            request.deliver([], True, message)

    def _deliver(self, news: list[tuple[int, list[int], bool, str | None]], stats: LoopStats, taken: int) -> None:
        now = time.monotonic()
        with self._send_lock:
            # In place: metrics read this object.
            self.stats.running, self.stats.waiting, self.stats.free_blocks = stats.running, stats.waiting, \
                stats.free_blocks
            self._taken = taken
            requests = [self._active.get(request_id) for request_id, *_ in news]
            for request_id, _, finished, _ in news:
                if finished:
                    self._active.pop(request_id, None)
        for request, (_, tokens, finished, error) in zip(requests, news):
            if request is None:  # cancelled meanwhile
                continue
            if tokens and request.first_token_at is None:
                request.first_token_at = now
            request.generated += len(tokens)
            if self.on_step is not None:
                self.on_step(request, len(tokens), finished)
            request.deliver(tokens, finished, error)


class _Outbox:
    """The engine process's side of the events pipe: news gathered during a step, sent
    in one message when the loop has changed something. Its two threads (the loop's and
    the commands') both add to it."""

    def __init__(self, events: Connection) -> None:
        self.events = events
        self.lock = threading.Lock()
        self.news: list[tuple[int, list[int], bool, str | None]] = []
        self.stats = LoopStats()
        self.taken = 0
        self.sent: tuple | None = None

    def put(self, request_id: int, tokens: list[int], finished: bool, error: str | None) -> None:
        with self.lock:
            self.news.append((request_id, tokens, finished, error))

    def flush(self) -> None:
        with self.lock:
            stats = self.stats
            state = (stats.running, stats.waiting, stats.free_blocks, stats.total_blocks, self.taken)
            if not self.news and state == self.sent:
                return
            news, self.news, self.sent = self.news, [], state
            self.events.send(("step", news, LoopStats(*state[:4]), self.taken))


def _engine_main(session_factory: Callable[[], Session], scheduler_options: dict,
                 process_setup: Callable[[], None] | None, commands: Connection, events: Connection) -> None:
    """The engine process: loads the session, then runs its loop on the commands until
    told to close, the server's end of the pipe closes, or the loop fails."""
    # Ctrl-C reaches the whole process group: the server decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if process_setup is not None:
        process_setup()
    try:
        session = session_factory()
        scheduler = session.new_scheduler(**scheduler_options)
    except Exception as error:  # noqa: BLE001 - the server prints it as its one-line error
        events.send(("failed", str(error) if isinstance(error, GlmEngineError) else
                     f"the engine could not start: {type(error).__name__}: {error}"))
        return
    outbox = _Outbox(events)
    engine_loop = EngineLoop(session, scheduler, after_changes=outbox.flush)
    outbox.stats = engine_loop.stats
    manager = session.block_manager
    events.send(("ready", EngineLimits(session.build_config, session.model_config.vocab_size,
                                       session.model_config.eos_token_id, manager.num_blocks, manager.block_size)))
    timeout = _serve_commands(engine_loop, outbox, commands)
    if timeout is not None:
        engine_loop.close(timeout)
    with contextlib.suppress(OSError):  # the server may be gone
        events.send(("stopped", "the server shut down before the request finished" if timeout is not None
                     else "the engine failed; see the server's log"))


def _serve_commands(engine_loop: EngineLoop, outbox: _Outbox, commands: Connection) -> float | None:
    """Passes the server's requests and cancellations to the loop. Returns the seconds
    running requests get once the server closes (0 when it is gone), None if the loop failed."""
    while True:
        if not commands.poll(POLL_SECONDS):
            if not engine_loop.alive:
                return None  # it failed: every request already heard why
            continue
        try:
            command = commands.recv()
        except EOFError:  # the server is gone: nobody waits for the rest
            return 0.0
        if command[0] == "submit":
            _, request_id, prompt, sampling = command
            deliver = functools.partial(outbox.put, request_id)
            try:
                engine_loop.submit(request_id, LoopRequest(prompt, sampling, deliver))
            except GlmEngineError as error:
                deliver([], True, str(error))
            with outbox.lock:
                outbox.taken += 1
            outbox.flush()
        elif command[0] == "cancel":
            engine_loop.cancel(command[1])  # one that finished meanwhile is no longer there
        else:  # close
            return command[1]
