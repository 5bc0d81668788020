"""Incremental detokenization: the text of one sequence's tokens as they come, each
token decoded a bounded number of times (work linear in the output), the pieces
adding up to exactly the tokenizer's decode of all of them.

Each step decodes only the tokens not released yet: the new ones, after those of a
character whose bytes were not all there (held back until they are). They are
decoded as text that follows other text (SentencePiece drops the leading space of a
text's first piece only at the start), except while no text has come out at all,
when the window starts at the first token. Silent ids (special tokens) render as
nothing anywhere, so they never enter a window."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import Protocol

CHUNK_TOKENS = 8  # new tokens per window: each one's end is measured on a prefix of the window


class TextDecoder(Protocol):
    """What the detokenizer needs of a tokenizer (glm_engine.text.tokenizer.ChatGLMTokenizer)."""

    silent_ids: frozenset[int]

    def decode(self, ids: Iterable[int], hold_incomplete: bool = False, within_text: bool = False) -> str:
        """Text of `ids`; with `hold_incomplete`, without an unfinished last character;
        with `within_text`, as the ids render after other text."""

    def unfinished_tail(self, ids: Sequence[int]) -> int:
        """How many trailing ids decode(ids, hold_incomplete=True) leaves out."""


class IncrementalDetokenizer:
    """The text of one sequence's tokens, given as they come.

    add() returns only the new text; the text of a character whose bytes are not all
    there yet is held back until they are, or until finish() releases it. All the
    pieces joined equal ``tokenizer.decode(all the tokens)``. A token is released when
    its text is final; ``ends[i]`` is the character offset where released token i's
    text ends (a character made of several byte pieces is the text of each of them),
    so that tokens_within() maps characters back to token counts.
    """

    def __init__(self, tokenizer: TextDecoder) -> None:
        self.tokenizer = tokenizer
        self.ends: list[int] = []
        self.length = 0  # characters released
        self._parts: list[str] = []
        self._opening: list[int] = []  # ids released before any text, which render none: the window's start
        self._pending: list[int] = []  # an unfinished character's ids (silent ones among them), not released
        self._finished = False

    @property
    def text(self) -> str:
        """All the text released so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def released(self) -> int:
        """How many tokens have their text released (all but an unfinished character's)."""
        return len(self.ends)

    def tokens_within(self, chars: int) -> int:
        """The most leading tokens whose text lies within the first `chars` characters."""
        return bisect_right(self.ends, chars)

    def add(self, token_ids: Iterable[int]) -> str:
        """Takes the next tokens; returns the text they release."""
        ids = [int(token_id) for token_id in token_ids]
        if ids and self._finished:
            raise ValueError("tokens added after finish(): the end was already released")
        silent, pieces, chunk, audible = self.tokenizer.silent_ids, [], [], 0
        for token_id in ids:
            chunk.append(token_id)
            audible += token_id not in silent
            if audible == CHUNK_TOKENS:
                pieces.append(self._release(chunk, hold=True))
                chunk, audible = [], 0
        if chunk:
            pieces.append(self._release(chunk, hold=True))
        return "".join(pieces)

    def finish(self) -> str:
        """Releases the held end (an unfinished character's bytes, each shown as ``⁇`` as
        decode() shows them) and returns its text; no tokens may be added after it."""
        self._finished = True
        return self._release([], hold=False) if self._pending else ""

    def _release(self, ids: list[int], hold: bool) -> str:
        """Decodes the pending and new `ids`; releases all of them but an unfinished
        character's (when `hold`); returns the released text."""
        silent = self.tokenizer.silent_ids
        tokens = self._pending + ids
        if hold and all(token_id in silent for token_id in ids):  # no text comes of them
            if self._pending:
                self._pending = tokens
            else:
                self.ends += [self.length] * len(ids)
            return ""
        opening = [] if self.length else self._opening
        window = opening + [token_id for token_id in tokens if token_id not in silent]
        count = len(window) - len(opening) - (self.tokenizer.unfinished_tail(window) if hold else 0)
        prefixes = [self.tokenizer.decode(window[:stop], within_text=self.length > 0)
                    for stop in range(len(opening) + 1, len(opening) + count + 1)]
        text = prefixes[-1] if prefixes else ""
        # A prefix that is not the start of the text ends inside a character (its first
        # bytes render as "⁇" until the rest comes): those tokens end where it ends.
        self._record(tokens, [self.length + len(prefix) for prefix in prefixes],
                     [not text.startswith(prefix) for prefix in prefixes])
        if not self.length and not text:
            self._opening = window[:len(opening) + count]
        self._parts.append(text)
        self.length += len(text)
        return text

    def _record(self, tokens: list[int], ends: list[int], unfinished: list[bool]) -> None:
        """Appends the ends of the released tokens: the first len(ends) that render text,
        with the silent ones among and after them; keeps the rest pending. The bytes of a
        character all end where it ends."""
        silent = self.tokenizer.silent_ids
        released: list[int] = []
        waiting: list[bool] = []
        audible = 0
        for position, token_id in enumerate(tokens):
            if token_id in silent:
                released.append(released[-1] if released else self.length)
                waiting.append(bool(waiting) and waiting[-1])
                continue
            if audible == len(ends):
                self._pending = tokens[position:]
                break
            released.append(ends[audible])
            waiting.append(unfinished[audible])
            audible += 1
        else:
            self._pending = []
        for index in range(len(released) - 2, -1, -1):
            if waiting[index]:
                released[index] = released[index + 1]
        self.ends += released
