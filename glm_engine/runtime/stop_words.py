"""Stop strings: a request stops when its generated text contains one, and the text
from it on is not returned. The check is on text, so a stop string is found however
the tokens split it; tokens that might begin one are held back until they cannot."""

from __future__ import annotations

from collections.abc import Callable


class StopStrings:
    """Watches one request's generated text for its stop strings."""

    def __init__(self, strings: tuple[str, ...], decode: Callable[[list[int]], str]) -> None:
        self.strings, self.decode = strings, decode

    def visible(self, output: list[int], final: bool) -> tuple[int, bool]:
        """(how many tokens of `output` may be returned, whether a stop string was found).
        Found: the tokens whose text lies before it. Not found: all of them when `final`,
        else those before any tail of the text that begins a stop string."""
        text = self.decode(output)
        found = [position for position in (text.find(string) for string in self.strings) if position >= 0]
        if found:
            return self._tokens_within(output, min(found)), True
        if final:
            return len(output), False
        held = max((size for string in self.strings for size in range(1, len(string))
                    if text.endswith(string[:size])), default=0)
        return self._tokens_within(output, len(text) - held), False

    def _tokens_within(self, output: list[int], chars: int) -> int:
        """The most leading tokens whose text fits in the first `chars` characters."""
        count = len(output)
        while count and len(self.decode(output[:count])) > chars:
            count -= 1
        return count
