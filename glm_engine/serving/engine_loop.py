"""The engine process's loop (serve.py): one thread that drives the session for the
server. Between steps it takes the server's commands from a pipe (submit: the
session's add_request; cancel: its abort; close), runs a step while there is work,
and sends back, once per turn that changed something, every request's news (new
tokens, their log-probs when asked, finished, error) with the engine's stats and its
prefix cache's counters. The requests' callbacks, the queue
limit and the metrics are the server's (serving/engine_process.py).

Commands: ("submit", request_id, prompt, sampling), ("cancel", request_id),
("close", seconds running requests get). Events: ("step", news, EngineStats, commands
taken, PrefixCacheStats, the scheduler's speculative counts), then ("stopped", the
message that ends the requests still open).

A tensor-parallel engine (serve.py under torchrun) runs this loop on rank 0, which
alone hears the server; each turn it sends the commands it obeyed, and whether the
loop goes on, to the other ranks, which obey the same commands and step with it
(`follow`). While idle it sends an empty turn every IDLE_TURN_SECONDS, so that the
other ranks' wait never reaches the collectives' timeout."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from glm_engine import GlmEngineError
from glm_engine.runtime.session import EngineStats, Session

logger = logging.getLogger("engine_loop")

IDLE_TURN_SECONDS = 1.0

# A token's log-prob and the likeliest tokens of its step ((token id, log-prob), ...), when asked.
TokenLogProb = tuple[float, tuple[tuple[int, float], ...]]
# (request id, new tokens, finished, error, the new tokens' log-probs or None when not asked)
News = tuple[int, list[int], bool, str | None, list[TokenLogProb] | None]


@dataclass(frozen=True)
class PrefixCacheStats:
    """The prefix cache's counters (runtime/block_manager.py): prompt tokens looked up at
    admission and found, cached blocks handed out for new content, blocks cached now."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    evicted_blocks: int = 0
    cached_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        """Share of the prompt tokens looked up that were found (0 before any)."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def prefix_cache_stats(session: Session) -> PrefixCacheStats:
    """The session's prefix cache counters now (all 0 with prefix caching off)."""
    manager = session.block_manager
    return PrefixCacheStats(manager.queried_tokens, manager.hit_tokens, manager.evicted_blocks,
                            manager.cached_blocks if manager.prefix_caching else 0)


class EngineLoop:
    """Runs `session` for the commands read from `commands`; sends news on `events`."""

    def __init__(self, session: Session, commands: Connection, events: Connection) -> None:
        self.session = session
        self.commands, self.events = commands, events
        self.taken = 0  # submits taken from the pipe: the server counts those not taken yet as waiting
        self.close_by: float | None = None  # once closing: when requests still running end
        self.news: list[News] = []
        self.sent: tuple[EngineStats, int, PrefixCacheStats, dict[str, float]] | None = None
        self.parallel = session.parallel if session.parallel.world_size > 1 else None

    def run(self) -> str:
        """Serves commands until told to close (and the running requests finished or ran
        out of time), the server's end of the pipe closes, or a step fails. Returns the
        message that ends the requests still open."""
        try:
            while self._take_commands():
                if self.session.has_work:
                    self._step()
                self._send()
        except Exception as error:  # noqa: BLE001 - every waiting client must hear of it
            logger.exception("the engine loop stopped")
            return f"the engine failed: {error}"
        return "the server shut down before the request finished"

    def _take_commands(self) -> bool:
        """Takes every command waiting; with no work and no close pending, waits for one
        (at most IDLE_TURN_SECONDS with other ranks to keep in step). False when the loop
        ends. The other ranks get the commands obeyed and the verdict."""
        wait = not self.session.has_work and self.close_by is None
        obeyed, going = [], True
        while wait or self.commands.poll():
            if wait and self.parallel is not None and not self.commands.poll(IDLE_TURN_SECONDS):
                break
            wait = False
            try:
                command = self.commands.recv()
            except EOFError:  # the server is gone: nobody waits for the rest
                going = False
                break
            self._obey(command)
            obeyed.append(command)
        if going and self.close_by is not None:
            going = self.session.has_work and time.monotonic() < self.close_by
        if self.parallel is not None:
            self.parallel.rank0_object((obeyed, going))
        return going

    def _obey(self, command: tuple) -> None:
        kind = command[0]
        if kind == "submit":
            _, request_id, prompt, sampling = command
            self.taken += 1
            try:
                self.session.add_request(prompt, sampling, request_id)
            except GlmEngineError as error:
                self.news.append((request_id, [], True, str(error), None))
        elif kind == "cancel":
            self.session.abort(command[1])  # one that finished meanwhile is no longer there
        else:  # close
            self.close_by = time.monotonic() + command[1]

    def _step(self) -> None:
        result = self.session.step()
        tokens: dict[int, list[int]] = {}
        for request_id, token in result.tokens:
            tokens.setdefault(request_id, []).append(token)
        log_probs: dict[int, list[TokenLogProb]] = {}
        for request_id, value in result.log_probs:
            log_probs.setdefault(request_id, []).append((float(value), getattr(value, "top", ())))
        finished = set(result.finished)
        self.news += [(request_id, tokens.get(request_id, []), request_id in finished, None,
                       log_probs.get(request_id))
                      for request_id in tokens.keys() | finished]

    def _send(self) -> None:
        """Sends the news gathered and the stats, when either changed."""
        state = (self.session.stats(), self.taken, prefix_cache_stats(self.session),
                 self.session.scheduler.speculative_counts())
        if not self.news and state == self.sent:
            return
        self.events.send(("step", self.news, *state))
        self.news, self.sent = [], state


def follow(session: Session) -> None:
    """A tensor-parallel server's rank other than 0: obeys the commands rank 0's loop
    obeyed and steps when it does, until rank 0's loop ends. Rank 0 reports every error,
    so a request this rank refuses is refused there too."""
    while True:
        commands, going = session.parallel.rank0_object(None)
        for command in commands:
            if command[0] == "submit":
                _, request_id, prompt, sampling = command
                try:
                    session.add_request(prompt, sampling, request_id)
                except GlmEngineError:
                    pass
            elif command[0] == "cancel":
                session.abort(command[1])
        if not going:
            return
        if session.has_work:
            session.step()
