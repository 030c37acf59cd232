"""Stop-string search over streamed text, in constant time per character.

One Knuth-Morris-Pratt automaton per stop string: its state is the length of the longest
tail of the text so far that is a prefix of the stop string. A stop string has been found
when its state reaches its length; the largest state is how much text must be held back,
because it could still turn into a stop string. The cost per character does not grow with
the length of the stop strings, so one request's stop strings cannot slow the engine step
that every other request shares.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feeds text in order; finds the stop string that completes first (the longest on a tie)."""

    def __init__(self, stops: Sequence[str]):
        assert all(stops), "stop strings must not be empty"
        self.stops = list(stops)
        self._failure = [_failure_table(stop) for stop in self.stops]
        self._states = [0] * len(self.stops)
        self._first_chars = frozenset(stop[0] for stop in self.stops)

    @property
    def num_held(self) -> int:
        """Length of the longest tail of the text fed so far that is a prefix of a stop string."""
        return max(self._states, default=0)

    def feed(self, text: str) -> tuple[int, str] | None:
        """Advance over `text`; (end offset in `text`, stop string) of the first completed stop, else None."""
        if not any(self._states) and self._first_chars.isdisjoint(text):
            return None  # nothing started and nothing can start: every state stays 0
        for offset, char in enumerate(text):
            completed = None
            for index, stop in enumerate(self.stops):
                if self._advance(index, stop, char) == len(stop):
                    if completed is None or len(stop) > len(completed):
                        completed = stop
            if completed is not None:
                return offset + 1, completed
        return None

    def _advance(self, index: int, stop: str, char: str) -> int:
        state, failure = self._states[index], self._failure[index]
        if state == len(stop):  # a completed match continues as its longest proper border
            state = failure[state - 1]
        while state and stop[state] != char:
            state = failure[state - 1]
        if stop[state] == char:
            state += 1
        self._states[index] = state
        return state


def _failure_table(pattern: str) -> list[int]:
    """failure[i]: length of the longest proper prefix of pattern[:i + 1] that is also its suffix."""
    failure = [0] * len(pattern)
    length = 0
    for i in range(1, len(pattern)):
        while length and pattern[i] != pattern[length]:
            length = failure[length - 1]
        if pattern[i] == pattern[length]:
            length += 1
        failure[i] = length
    return failure
