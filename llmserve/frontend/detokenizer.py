"""Incremental detokenization (UTF-8 safe) and stop strings for one request.

Text comes from a text decoder (text_decoders.py: the tokenizers library's DecodeStream for fast
tokenizers, a window decoder otherwise), which never releases half a character. Stop strings are
matched on that text across token boundaries (stop_strings.py); any tail that could start one is
held back until it cannot, or until the request ends.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmserve.frontend.stop_strings import StopMatcher
from llmserve.frontend.text_decoders import REPLACEMENT_CHAR, make_decoder

__all__ = ["IncrementalDetokenizer", "REPLACEMENT_CHAR"]


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas; deltas + finish() == text."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], *, skip_special_tokens: bool = True,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False):
        self.stop = [s for s in stop if s]
        self._stop_matcher = StopMatcher(self.stop) if self.stop else None
        self.include_stop_str_in_output = include_stop_str_in_output
        self.text = ""
        self.stop_reason: str | None = None
        self._finished = False
        self._pending = ""  # decoded, but could be the start of a stop string
        self._decoder = make_decoder(tokenizer, prompt_token_ids, skip_special_tokens)

    def add_tokens(self, token_ids: list[int]) -> str:
        """Feed new output ids; returns the text that may be shown now (possibly "")."""
        if self.stop_reason is not None or self._finished:
            return ""
        return self._release(self._decoder.step(token_ids))

    def finish(self) -> str:
        """End of the request: returns whatever was held back (a partial stop string, a broken char)."""
        if self.stop_reason is not None or self._finished:
            return ""
        delta = self._release(self._decoder.flush())
        self._finished = True
        if self.stop_reason is None:
            delta += self._pending
            self.text += self._pending
            self._pending = ""
        return delta

    def _release(self, delta: str) -> str:
        """Apply stop strings to newly decoded text; returns what may be shown."""
        if not delta:
            return ""
        if self._stop_matcher is None:
            self.text += delta
            return delta
        buffer = self._pending + delta
        match = self._stop_matcher.feed(delta)
        if match is not None:
            end_in_delta, stop = match
            end = len(self._pending) + end_in_delta  # the stop string starts within the held-back text or delta
            cut = end if self.include_stop_str_in_output else end - len(stop)
            self.stop_reason, self._pending = stop, ""
            self.text += buffer[:cut]
            return buffer[:cut]
        held = self._stop_matcher.num_held
        released, self._pending = buffer[:len(buffer) - held], buffer[len(buffer) - held:]
        self.text += released
        return released
