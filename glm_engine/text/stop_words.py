"""Stop strings: a request stops when its generated text contains one, and the text
from it on is not returned. The check is on text, so a stop string is found however
the tokens split it; tokens that might begin one are held back until they cannot.

The text comes from an IncrementalDetokenizer: each check decodes only the tokens
added since the last one and reads only the new text, character by character, with
each string's matching state carried over."""

from __future__ import annotations

from glm_engine.text.detokenizer import IncrementalDetokenizer, TextDecoder


def _failure(string: str) -> list[int]:
    """KMP's failure table: for each prefix string[:i + 1], the length of its longest proper
    prefix that is also its suffix."""
    table, length = [0] * len(string), 0
    for index in range(1, len(string)):
        while length and string[index] != string[length]:
            length = table[length - 1]
        if string[index] == string[length]:
            length += 1
        table[index] = length
    return table


class StopStrings:
    """Watches one request's generated text for its stop strings. Each string's state is
    the length of its longest prefix the text ends with (Knuth-Morris-Pratt), so each new
    character costs a few steps per string, whatever the strings' lengths: the text held
    back is the longest such prefix, and a string is found when its state reaches its length."""

    def __init__(self, strings: tuple[str, ...], tokenizer: TextDecoder) -> None:
        self.strings, self.tokenizer = strings, tokenizer
        self.failures = [_failure(string) for string in strings]
        self._watch_from_start()

    def _watch_from_start(self) -> None:
        self.text = IncrementalDetokenizer(self.tokenizer)
        self.seen = 0  # tokens of the output given to the detokenizer
        self.last: int | None = None  # the last of them
        self.states = [0] * len(self.strings)  # per string: its longest prefix the text ends with
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
        if self.found is None:
            self.found = self._feed(new, self.text.length - len(new))
        if self.found is not None:
            return self.text.tokens_within(self.found), True
        if final:
            return len(output), False
        return self.text.tokens_within(self.text.length - max(self.states)), False

    def _feed(self, new: str, offset: int) -> int | None:
        """Advances every string's state over `new` (which starts at text position `offset`);
        the earliest start of a stop string completed in it (as a search of the whole text
        so far would find), or None."""
        strings, failures, states = self.strings, self.failures, self.states
        earliest = None
        for position, character in enumerate(new, offset):
            for index, string in enumerate(strings):
                state = states[index]
                while state and string[state] != character:
                    state = failures[index][state - 1]
                if string[state] == character:
                    state += 1
                if state == len(string):
                    start = position + 1 - len(string)
                    earliest = start if earliest is None else min(earliest, start)
                    state = failures[index][state - 1]
                states[index] = state
        return earliest
