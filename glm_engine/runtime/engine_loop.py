"""One engine loop for many clients (serve.py's engine process): a thread that owns
the session's scheduler, takes new requests and cancellations between steps, runs
steps while there is work, and hands each request its new tokens through a callback.
Limits, the queue limit and metrics are the server's (runtime/engine_process.py).

Other threads only queue work here (submit, cancel, close): the scheduler, the KV
pool and the device are touched by the loop's thread alone."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from glm_engine import GlmEngineError
from glm_engine.runtime.sampling import SamplingConfig
from glm_engine.runtime.scheduler import Scheduler
from glm_engine.runtime.session import Session

logger = logging.getLogger("engine_loop")


class LoopClosed(GlmEngineError):
    """The loop is shutting down or has stopped."""


@dataclass
class LoopRequest:
    """A request and where its tokens go. `deliver(tokens, finished, error)` runs on the
    loop's thread after each step that gives the request tokens or ends it. The times
    and count are the server's, for its metrics."""

    prompt: list[int]
    sampling: SamplingConfig
    deliver: Callable[[list[int], bool, str | None], None]
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    generated: int = 0


@dataclass
class LoopStats:
    """What the loop last saw, for health and metrics (written by the loop's thread)."""

    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    total_blocks: int = 0


class EngineLoop:
    """Runs `scheduler` (one of `session`'s) for requests submitted from any thread."""

    def __init__(self, session: Session, scheduler: Scheduler,
                 after_changes: Callable[[], None] | None = None) -> None:
        """`after_changes()` runs once the loop's thread has delivered a batch of news or
        changed its stats (the engine process sends them on then)."""
        self.session = session
        self.scheduler = scheduler
        self.after_changes = after_changes
        self.stats = LoopStats(total_blocks=session.block_manager.num_blocks,
                               free_blocks=session.block_manager.free_blocks)
        self._condition = threading.Condition()
        self._incoming: deque[tuple[int, LoopRequest]] = deque()
        self._cancelled: set[int] = set()
        self._active: dict[int, LoopRequest] = {}
        self._closing = False
        self._abort_all = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, request_id: int, request: LoopRequest) -> None:
        """Queues request `request_id` (the caller's unique id); refuses any once closing
        (LoopClosed). One the engine cannot hold ends with its error, delivered."""
        with self._condition:
            if self._closing:
                raise LoopClosed("the server is shutting down")
            self._incoming.append((request_id, request))
            self._condition.notify()

    @property
    def alive(self) -> bool:
        """Whether the loop still takes requests (False once closing, or after a failure)."""
        return self._thread.is_alive() and not self._closing

    def cancel(self, request_id: int) -> None:
        """Drops a request (its client left): its blocks are freed before the next step."""
        with self._condition:
            self._cancelled.add(request_id)
            self._condition.notify()

    def close(self, timeout: float) -> None:
        """Refuses new requests, lets running and queued ones finish for up to `timeout`
        seconds, then ends the rest with an error; returns when the thread has stopped."""
        with self._condition:
            self._closing = True
            self._condition.notify()
        self._thread.join(timeout)
        with self._condition:
            self._abort_all = True
            self._condition.notify()
        self._thread.join()

    def _run(self) -> None:
        try:
            while self._next_work():
                if self.scheduler.has_work:
                    self._step()
        except Exception as error:  # noqa: BLE001 - every waiting client must hear of it
            logger.exception("the engine loop stopped")
            self._end_all(f"the engine failed: {error}")
            with self._condition:
                self._closing = True
            return
        self._end_all("the server shut down before the request finished")

    def _next_work(self) -> bool:
        """Takes queued requests and cancellations into the scheduler; False when the loop ends."""
        with self._condition:
            while not (self._incoming or self._cancelled or self.scheduler.has_work or self._closing):
                self._condition.wait()
            if self._abort_all or (self._closing and not (self._incoming or self.scheduler.has_work)):
                return False
            incoming, self._incoming = list(self._incoming), deque()
            cancelled, self._cancelled = self._cancelled, set()
        for request_id, request in incoming:
            try:
                self.session.submit(self.scheduler, request_id, request.prompt, request.sampling)
                self._active[request_id] = request
            except GlmEngineError as error:
                request.deliver([], True, str(error))
        for request_id in cancelled:
            if self._active.pop(request_id, None) is not None:
                self.scheduler.abort(request_id)
        self._update_stats()
        return True

    def _step(self) -> None:
        result = self.session.step(self.scheduler)
        news: dict[int, list[int]] = {}
        for request_id, token in result.tokens:
            news.setdefault(request_id, []).append(token)
        finished = set(result.finished)
        for request_id in news.keys() | finished:
            request = self._active.get(request_id)
            if request is None:
                continue
            request.deliver(news.get(request_id, []), request_id in finished, None)
            if request_id in finished:
                del self._active[request_id]
        self._update_stats()

    def _update_stats(self) -> None:
        self.stats.running = len(self.scheduler.running)
        self.stats.waiting = sum(len(unit) for unit in self.scheduler.waiting)
        self.stats.free_blocks = self.session.block_manager.free_blocks
        if self.after_changes is not None:
            self.after_changes()

    def _end_all(self, message: str) -> None:
        for request_id, request in list(self._active.items()):
            self.scheduler.abort(request_id)
            request.deliver([], True, message)
        self._active.clear()
        with self._condition:
            incoming, self._incoming = list(self._incoming), deque()
        for _, request in incoming:
            request.deliver([], True, message)
        self._update_stats()
