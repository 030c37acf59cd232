"""Token ids to text, one step at a time, never releasing half a character.

Two decoders with one contract (`step(ids) -> new complete text`, `flush() -> the rest at the end`):
- StreamDecoder: the tokenizers library's own incremental decoder (`DecodeStream`), for fast (Rust)
  tokenizers — what every HF model of the LLaMA family ships;
- WindowDecoder: decodes a small window of recent ids by hand, for any tokenizer with `decode`.

Both start from a few prompt tokens of context, so that tokenizers which treat a leading space
specially (SentencePiece) decode the first output token as they would mid-text. Byte-level BPE
splits multi-byte characters across tokens: text ending in U+FFFD waits for the missing bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

REPLACEMENT_CHAR = "\ufffd"
NUM_PROMPT_CONTEXT_TOKENS = 5
Decode = Callable[[list[int]], str]


def make_decoder(tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool):
    """The fastest decoder `tokenizer` supports, primed with the prompt's last tokens."""
    backend = _fast_backend(tokenizer)
    if backend is not None:
        decode = _backend_decode(backend, skip_special_tokens)
        return StreamDecoder(backend, decode, prompt_context(decode, prompt_token_ids), skip_special_tokens)
    decode = _hf_decode(tokenizer, skip_special_tokens)
    return WindowDecoder(decode, prompt_context(decode, prompt_token_ids))


def prompt_context(decode: Decode, prompt_token_ids: list[int]) -> list[int]:
    """The prompt's last few ids, or none when they end inside a character (they would swallow output bytes)."""
    context = list(prompt_token_ids[-NUM_PROMPT_CONTEXT_TOKENS:])
    return [] if decode(context).endswith(REPLACEMENT_CHAR) else context


def _fast_backend(tokenizer):
    """The `tokenizers.Tokenizer` behind an HF fast tokenizer, when DecodeStream can drive it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream  # noqa: F401 (older tokenizers lack it)
    except ImportError:
        return None
    return backend if isinstance(backend, Tokenizer) else None


def _backend_decode(backend, skip_special_tokens: bool) -> Decode:
    return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)


def _hf_decode(tokenizer, skip_special_tokens: bool) -> Decode:
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                        clean_up_tokenization_spaces=False)


class StreamDecoder:
    """tokenizers.decoders.DecodeStream, plus the final flush it lacks and a fallback should it refuse."""

    def __init__(self, backend, decode: Decode, context_ids: list[int], skip_special_tokens: bool):
        from tokenizers.decoders import DecodeStream

        self._backend = backend
        self._decode = decode
        self._stream = DecodeStream(context_ids, skip_special_tokens=skip_special_tokens)
        self._fallback: WindowDecoder | None = None
        self._released_ids = list(context_ids)  # ids of the last released piece: context for the flush
        self._held_ids: list[int] = []  # fed, not yet released: an incomplete character

    def step(self, token_ids: list[int]) -> str:
        """New complete text after `token_ids` ("" while a character is incomplete)."""
        if self._fallback is not None:
            return self._fallback.step(token_ids)
        self._held_ids.extend(token_ids)
        try:
            text = self._stream.step(self._backend, token_ids)
        except Exception as exc:  # noqa: BLE001 (DecodeStream refuses text that rewrites its past)
            logger.debug("DecodeStream failed (%s); decoding by windows from here", exc)
            self._fallback = WindowDecoder(self._decode, self._released_ids)
            held, self._held_ids = self._held_ids, []
            return self._fallback.step(held)
        if text is None:
            return ""
        self._released_ids, self._held_ids = self._held_ids, []
        return text

    def flush(self) -> str:
        """End of the stream: the held ids as text, broken characters included (as U+FFFD)."""
        if self._fallback is not None:
            return self._fallback.flush()
        if not self._held_ids:
            return ""
        context = self._decode(self._released_ids)
        text = self._decode(self._released_ids + self._held_ids)
        held, self._held_ids = self._held_ids, []
        return text[len(context):] if text.startswith(context) else self._decode(held)


class WindowDecoder:
    """Decodes the ids of the last released piece plus the new ones, and releases the difference."""

    def __init__(self, decode: Decode, context_ids: list[int]):
        self._decode = decode
        self._token_ids = list(context_ids)
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self._prefix_text = decode(self._token_ids)

    def step(self, token_ids: list[int]) -> str:
        """New complete text after `token_ids` ("" while a character is incomplete)."""
        self._token_ids.extend(token_ids)
        return self._decode_window(final=False)

    def flush(self) -> str:
        """End of the stream: whatever was held, broken characters included."""
        return self._decode_window(final=True)

    def _decode_window(self, final: bool) -> str:
        window_text = self._decode(self._token_ids[self._prefix_offset:])
        if len(window_text) <= len(self._prefix_text):
            return ""
        if window_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""
        delta = window_text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        self._prefix_text = self._decode(self._token_ids[self._prefix_offset:self._read_offset])
        return delta
