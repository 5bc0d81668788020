"""Stop strings: a request stops when its generated text contains one, and the text
from it on is not returned. The check is on text, so a stop string is found however
the tokens split it; tokens that might begin one are held back until they cannot.

The text comes from an IncrementalDetokenizer: each check decodes only the tokens
added since the last one and searches only the new text and the few characters
before it that a stop string could start in."""

from __future__ import annotations

from glm_engine.text.detokenizer import IncrementalDetokenizer, TextDecoder


class StopStrings:
    """Watches one request's generated text for its stop strings."""

    def __init__(self, strings: tuple[str, ...], tokenizer: TextDecoder) -> None:
        self.strings, self.tokenizer = strings, tokenizer
        self.overlap = max(len(string) for string in strings) - 1  # where a stop string ending in new text may start
        self._watch_from_start()

    def _watch_from_start(self) -> None:
        self.text = IncrementalDetokenizer(self.tokenizer)
        self.seen = 0  # tokens of the output given to the detokenizer
        self.last: int | None = None  # the last of them
        self.tail = ""  # the last `overlap` characters searched
        self.found: int | None = None  # where the first stop string starts in the text

    def visible(self, output: list[int], final: bool) -> tuple[int, bool]:
        """(how many tokens of `output` may be returned, whether a stop string was found).
        Found: the tokens whose text lies before it. Not found: all of them when `final`,
        else those before any tail of the text that begins a stop string (and before a
        character whose bytes are not all there). `output` is the request's output, grown
        since the last call; a shorter or another one is watched from its start."""
        if len(output) < self.seen or (self.seen and output[self.seen - 1] != self.last):
            self._watch_from_start()
        new = self.text.add(output[self.seen:])
        self.seen, self.last = len(output), output[-1] if output else None
        if final:
            new += self.text.finish()
        window = self.tail + new
        start = self.text.length - len(window)  # of the window in the text
        self.tail = window[len(window) - self.overlap:] if len(window) > self.overlap else window
        found = [position for position in (window.find(string) for string in self.strings) if position >= 0]
        if found and self.found is None:
            self.found = start + min(found)
        if self.found is not None:
            return self.text.tokens_within(self.found), True
        if final:
            return len(output), False
        held = max((size for string in self.strings for size in range(1, len(string))
                    if window.endswith(string[:size])), default=0)
        return self.text.tokens_within(self.text.length - held), False
