"""Incremental detokenization (UTF-8 safe) and stop strings for one request.

Each step decodes only a small window: the tokens of the last released piece
(`prefix_offset:read_offset`) plus the new ones, and releases the difference. A window
whose text ends in U+FFFD is held back: byte-level BPE splits multi-byte characters
across tokens, and the missing bytes may still come. Stop strings are matched on the
released text across token boundaries (stop_strings.py); any tail that could start one is held back.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmserve.frontend.stop_strings import StopMatcher

REPLACEMENT_CHAR = "\ufffd"
# prompt tokens decoded in front of the first output token, so that tokenizers which
# treat a leading space specially (SentencePiece) decode it as they would mid-text
NUM_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas; deltas + finish() == text."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], *, skip_special_tokens: bool = True,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in stop if s]
        self._stop_matcher = StopMatcher(self.stop) if self.stop else None
        self.include_stop_str_in_output = include_stop_str_in_output
        self.text = ""
        self.stop_reason: str | None = None
        self._finished = False
        self._pending = ""  # decoded, but could be the start of a stop string
        self._token_ids = self._prompt_context(prompt_token_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self._prefix_text = self._decode(self._token_ids)

    def _prompt_context(self, prompt_token_ids: list[int]) -> list[int]:
        context = list(prompt_token_ids[-NUM_PROMPT_CONTEXT_TOKENS:])
        # a context ending in an incomplete character would swallow the output's first bytes
        return [] if self._decode(context).endswith(REPLACEMENT_CHAR) else context

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add_tokens(self, token_ids: list[int]) -> str:
        """Feed new output ids; returns the text that may be shown now (possibly "")."""
        if self.stop_reason is not None or self._finished:
            return ""
        self._token_ids.extend(token_ids)
        return self._release(self._decode_window(final=False))

    def finish(self) -> str:
        """End of the request: returns whatever was held back (a partial stop string, a broken char)."""
        if self.stop_reason is not None or self._finished:
            return ""
        delta = self._release(self._decode_window(final=True))
        self._finished = True
        if self.stop_reason is None:
            delta += self._pending
            self.text += self._pending
            self._pending = ""
        return delta

    def _decode_window(self, final: bool) -> str:
        """New complete text since the last call; trailing broken characters wait unless `final`."""
        window_text = self._decode(self._token_ids[self._prefix_offset:])
        if len(window_text) <= len(self._prefix_text):
            return ""
        if window_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""
        delta = window_text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        self._prefix_text = self._decode(self._token_ids[self._prefix_offset:self._read_offset])
        return delta

    def _release(self, delta: str) -> str:
        """Apply stop strings to newly decoded text; returns what may be shown."""
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
