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
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from glm_engine import GlmEngineError
from glm_engine.serving.engine_loop import EngineLoop, News, PrefixCacheStats, TokenLogProb
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.runtime.session import EngineLimits, EngineStats, Session

logger = logging.getLogger("engine_process")

REAP_SECONDS = 30.0  # how long an engine process that is ending may take before it is killed
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class QueueFull(GlmEngineError):
    """More sequences would wait than the server's queue limit."""


class EngineClosed(GlmEngineError):
    """The engine is shutting down or has stopped."""


@dataclass
class EngineRequest:
    """A request and where its tokens go. `deliver(tokens, finished, error, log_probs)`
    runs on the receiving thread after each engine step that gives the request tokens or
    ends it (log_probs: the tokens' log-probs when the request asked, else None). The
    times and count are for the server's metrics."""

    prompt: list[int]
    sampling: SamplingConfig
    deliver: Callable[[list[int], bool, str | None, list[TokenLogProb] | None], None]
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
        try:
            with _stop_signals_deferred():  # a stop amid start() left the child half-told what to run (a traceback)
                self.process.start()
            child_commands.close()
            self._child_events.close()
            self._events = events
            self.limits, self.stats = self._wait_ready()  # stats: the engine's latest, replaced at each step
        except BaseException:  # SIGTERM or Ctrl-C while it loads: it must not load on, nobody to serve
            if self.process.pid is not None:
                self.process.kill()
                self.process.join()
            raise
        self.max_queue = max_queue
        self.on_step = on_step
        self.prefix_cache = PrefixCacheStats()  # the engine's latest counters
        self.speculative: dict[str, float] = {}  # and its speculative decoding's (Scheduler.speculative_counts)
        self._send_lock = threading.Lock()
        self._active: dict[int, EngineRequest] = {}
        self._submitted = 0  # requests sent; the engine process counts those it has taken
        self._taken = 0
        self._closing = False
        self._engine_alive = True
        self.stop_reason: str | None = None  # why the engine process ended, once it has
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

    def submit(self, requests: list[EngineRequest]) -> list[int]:
        """Sends one API request's sequences (its choices) to the engine, all or none;
        returns their ids. Refuses sequences the engine can never hold, or more than its
        slots and the queue can ever hold (GlmEngineError), sequences that would take the
        queue past its limit (QueueFull), any once closing (EngineClosed)."""
        for request in requests:
            self.limits.check(request.prompt, request.sampling)
        capacity = self.limits.max_in_flight + self.max_queue
        if len(requests) > capacity:
            raise GlmEngineError(f"{len(requests)} choices are more than the {self.limits.max_in_flight} sequences "
                                 f"in flight and the {self.max_queue} of the queue; ask for fewer or raise "
                                 "--max_queue")
        with self._send_lock:
            if not self.alive:
                raise EngineClosed("the server is shutting down" if self._closing else "the engine has stopped")
            if self._waiting_with(len(requests)) > self.max_queue:
                raise QueueFull(f"{self.max_queue} sequences may wait and this request's {len(requests)} would "
                                "not fit; retry later")
            ids = []
            for request in requests:
                request_id = self._submitted
                try:
                    self._commands.send(("submit", request_id, request.prompt, request.sampling))
                except OSError:  # it died a moment ago (BrokenPipeError); the receiver is finding out
                    raise EngineClosed("the engine has stopped") from None
                self._submitted += 1
                self._active[request_id] = request
                ids.append(request_id)
        return ids

    def _waiting_with(self, new: int) -> int:
        """Sequences that would wait for a slot with `new` more: those the engine last
        reported waiting, and of those sent since (and the new) the ones beyond the slots
        it then had free. Sent-but-not-taken sequences that will find a slot do not count,
        so an idle server takes whatever fits its slots."""
        stats = self.stats
        free = max(0, self.limits.max_in_flight - stats.running - stats.waiting)
        return stats.waiting + max(0, self._submitted - self._taken + new - free)

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
        # The close command ends the requests still running after `timeout`; the receiver then reaps the process.
        self._receiver.join(timeout + REAP_SECONDS)
        if self._receiver.is_alive():  # the engine hangs in a step: kill it, the receiver ends its requests
            logger.warning("the engine process did not stop; killing it")
            self.process.kill()
            self._receiver.join()

    def _receive(self) -> None:
        """Hands each step's news to the requests (on this thread) until the engine process
        ends; then reaps it and ends the requests still open with the reason."""
        message = None
        try:
            while True:
                kind, *payload = self._events.recv()
                if kind != "step":
                    message = payload[0]
                    break
                self._deliver(*payload)
        except (EOFError, OSError):
            pass
        self._reap()
        if message is None:
            message = f"the engine process exited unexpectedly ({_exit_reason(self.process.exitcode)})"
        with self._send_lock:
            self._engine_alive = False
            self.stop_reason = message
            self.stats = EngineStats()  # nothing runs or waits in a stopped engine
            orphans, self._active = list(self._active.values()), {}
        if orphans:
            logger.error("%s; ending %d requests", message, len(orphans))
        for request in orphans:
            request.deliver([], True, message, None)

    def _reap(self) -> None:
        """Waits for the engine process to exit (it has closed its pipe or said it stops),
        so that its exit code is known and it leaves no zombie; kills one that hangs."""
        self.process.join(REAP_SECONDS)
        if self.process.is_alive():
            logger.warning("the engine process did not exit; killing it")
            self.process.kill()
            self.process.join()

    def _deliver(self, news: list[News], stats: EngineStats, taken: int, prefix_cache: PrefixCacheStats,
                 speculative: dict[str, float]) -> None:
        now = time.monotonic()
        with self._send_lock:
            self.stats, self._taken, self.prefix_cache, self.speculative = stats, taken, prefix_cache, speculative
            requests = [self._active.get(request_id) for request_id, *_ in news]
            for request_id, _, finished, *_ in news:
                if finished:
                    self._active.pop(request_id, None)
        for request, (_, tokens, finished, error, log_probs) in zip(requests, news):
            if request is None:  # cancelled meanwhile
                continue
            if tokens and request.first_token_at is None:
                request.first_token_at = now
            request.generated += len(tokens)
            if self.on_step is not None:
                self.on_step(request, len(tokens), finished)
            request.deliver(tokens, finished, error, log_probs)


def _exit_reason(exit_code: int | None) -> str:
    """An exit code in words: `exit code 1`, `killed by SIGKILL`."""
    if exit_code is not None and exit_code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exit_code).name}"
    return f"exit code {exit_code}"


def _leave_a_core() -> None:
    """On the CPU, torch's threads take one core fewer than this process may use, leaving
    one to the HTTP side (torch's busy-waiting threads starved it: one long request
    slowed every other request's answer several times over)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - 1)))


@contextlib.contextmanager
def _stop_signals_deferred():
    """SIGTERM and SIGINT noted and raised again when the block ends, to the handlers
    of before (a signal mask would not do: another thread may take the signal). Only the
    main thread sets handlers: elsewhere nothing is deferred."""
    caught: list[int] = []
    try:
        previous = {number: signal.signal(number, lambda number, frame: caught.append(number))
                    for number in STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if caught:
            signal.raise_signal(caught[0])


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
        with contextlib.suppress(OSError):  # the server may have stopped meanwhile
            events.send(("failed", str(error) if isinstance(error, GlmEngineError) else
                         f"the engine could not start: {type(error).__name__}: {error}"))
        return
    if session.device.type == "cpu":
        _leave_a_core()
    try:
        events.send(("ready", session.limits, session.stats()))
    except OSError:  # the server stopped while this process was loading: nobody to serve
        return
    message = EngineLoop(session, commands, events).run()
    with contextlib.suppress(OSError):  # the server may be gone
        events.send(("stopped", message))
