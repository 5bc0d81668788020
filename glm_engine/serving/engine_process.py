"""serve.py's engine in a process of its own. The HTTP side (parsing, tokenizing,
detokenizing, server-sent events) and the engine loop each get an interpreter, so the
engine's steps never wait on the HTTP side's Python for the GIL (sharing one process,
the server ran at 0.54x the engine's in-process throughput).

EngineProcess, in the server's process, is what the HTTP side calls (submit, cancel,
close, alive, stats, on_step for metrics); it keeps the requests open (the one map of
them) and checks each against the engine's limits (EngineLimits.check, the session's
own check, on the limits the engine process sent) and the queue limit before it sends
it. One pipe carries commands to the engine process's loop (serving/engine_loop.py);
the other carries, once per engine step, every request's news and the engine's stats."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from glm_engine import GlmEngineError
from glm_engine.serving.engine_loop import EngineLoop, News
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.runtime.session import EngineLimits, EngineStats, Session

logger = logging.getLogger("engine_process")


class QueueFull(GlmEngineError):
    """More requests wait than the server's queue limit."""


class EngineClosed(GlmEngineError):
    """The engine is shutting down or has stopped."""


@dataclass
class EngineRequest:
    """A request and where its tokens go. `deliver(tokens, finished, error)` runs on the
    receiving thread after each engine step that gives the request tokens or ends it.
    The times and count are for the server's metrics."""

    prompt: list[int]
    sampling: SamplingConfig
    deliver: Callable[[list[int], bool, str | None], None]
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    generated: int = 0


class EngineProcess:
    """Starts the engine process (a session from `session_factory`, run by an EngineLoop)
    and talks to it; requests are submitted, cancelled and closed from any thread."""

    def __init__(self, session_factory: Callable[[], Session], max_queue: int = 1024,
                 on_step: Callable[[EngineRequest, int, bool], None] | None = None,
                 process_setup: Callable[[], None] | None = None) -> None:
        """`session_factory` runs in the new process, after `process_setup` (logging); both
        must pickle (module-level functions or functools.partials of them). Returns once
        the engine is loaded; raises GlmEngineError with the engine process's message if
        it could not start."""
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._commands, child_commands = context.Pipe(duplex=False)[::-1]
        events, self._child_events = context.Pipe(duplex=False)
        self.process = context.Process(target=_engine_main, name="glm-engine",
                                       args=(session_factory, process_setup, child_commands, self._child_events))
        self.process.start()
        child_commands.close()
        self._child_events.close()
        self._events = events
        self.limits, self.stats = self._wait_ready()  # stats: the engine's latest, replaced at each step
        self.max_queue = max_queue
        self.on_step = on_step
        self._send_lock = threading.Lock()
        self._active: dict[int, EngineRequest] = {}
        self._submitted = 0  # requests sent; the engine process counts those it has taken
        self._taken = 0
        self._closing = False
        self._engine_alive = True
        self._receiver = threading.Thread(target=self._receive, name="engine-events", daemon=True)
        self._receiver.start()

    def _wait_ready(self) -> tuple[EngineLimits, EngineStats]:
        try:
            message = self._events.recv()
        except EOFError:
            self.process.join()
            raise GlmEngineError(f"the engine process exited while starting (exit code {self.process.exitcode})") \
                from None
        if message[0] == "failed":
            self.process.join()
            raise GlmEngineError(message[1])
        return message[1], message[2]

    @property
    def alive(self) -> bool:
        """Whether the engine still takes requests (False once closing, or after a failure)."""
        return self._engine_alive and not self._closing and self.process.is_alive()

    def submit(self, request: EngineRequest) -> int:
        """Sends a request to the engine; returns its id. Refuses one the engine can never
        hold (GlmEngineError), one past the queue limit (QueueFull), any once closing (EngineClosed)."""
        self.limits.check(request.prompt, request.sampling)
        with self._send_lock:
            if not self.alive:
                raise EngineClosed("the server is shutting down" if self._closing else "the engine has stopped")
            # Requests not yet taken by the engine process count as waiting.
            if self.stats.waiting + self._submitted - self._taken >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting; retry later")
            request_id = self._submitted
            try:
                self._commands.send(("submit", request_id, request.prompt, request.sampling))
            except OSError:  # it died a moment ago (BrokenPipeError); the receiver is finding out
                raise EngineClosed("the engine has stopped") from None
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

    def _deliver(self, news: list[News], stats: EngineStats, taken: int) -> None:
        now = time.monotonic()
        with self._send_lock:
            self.stats, self._taken = stats, taken
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


def _engine_main(session_factory: Callable[[], Session], process_setup: Callable[[], None] | None,
                 commands: Connection, events: Connection) -> None:
    """The engine process: loads the session, then runs its loop on the commands until
    told to close, the server's end of the pipe closes, or a step fails."""
    # Ctrl-C reaches the whole process group: the server decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if process_setup is not None:
        process_setup()
    try:
        session = session_factory()
    except Exception as error:  # noqa: BLE001 - the server prints it as its one-line error
        events.send(("failed", str(error) if isinstance(error, GlmEngineError) else
                     f"the engine could not start: {type(error).__name__}: {error}"))
        return
    events.send(("ready", session.limits, session.stats()))
    message = EngineLoop(session, commands, events).run()
    with contextlib.suppress(OSError):  # the server may be gone
        events.send(("stopped", message))
