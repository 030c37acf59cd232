"""StopMatcher: the same answers as a brute-force search, at a cost per character that stop lengths do not raise."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from llmserve.frontend.stop_strings import StopMatcher

stops_strategy = st.lists(st.text(alphabet="abc", min_size=1, max_size=6), min_size=1, max_size=4)
chunks_strategy = st.lists(st.text(alphabet="abcd", max_size=5), max_size=12)


def first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """(end, stop) of the stop string that ends first in `text`, the longest on a tie."""
    for end in range(1, len(text) + 1):
        ending = [stop for stop in stops if text[:end].endswith(stop)]
        if ending:
            return end, max(ending, key=len)
    return None


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    return max((n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)


@given(stops=stops_strategy, chunks=chunks_strategy)
def test_matches_brute_force_over_any_chunking(stops, chunks):
    matcher, text = StopMatcher(stops), ""
    for chunk in chunks:
        found = matcher.feed(chunk)
        expected = first_stop(text + chunk, stops)
        if expected is not None:
            assert found == (expected[0] - len(text), expected[1])
            return
        assert found is None
        text += chunk
        assert matcher.num_held == held_back(text, stops)


def test_overlapping_stops_end_first_then_longest():
    assert StopMatcher(["bcd", "abcde"]).feed("xabcde") == (5, "bcd")
    assert StopMatcher(["cd", "abcd"]).feed("abcd") == (4, "abcd")
    matcher = StopMatcher(["aab"])
    assert matcher.feed("aaa") is None and matcher.num_held == 2
    assert matcher.feed("b") == (1, "aab")


def test_cost_per_token_does_not_grow_with_stop_length():
    # the server's limits, 16 stop strings of 256 characters, with 255 characters held back all along
    stops = [letter * 256 for letter in "cdefghijklmnopq"] + ["a" * 255 + "b"]
    matcher = StopMatcher(stops)
    start = time.perf_counter()
    for _ in range(2000):  # 2,000 four-character tokens
        assert matcher.feed("aaaa") is None
    elapsed = time.perf_counter() - start
    assert matcher.num_held == 255
    assert elapsed < 0.5, f"{elapsed:.3f} s for 2,000 tokens"  # rescanning the held text took 2 s
