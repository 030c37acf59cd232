"""Log-probabilities in OpenAI's two shapes: chat (`content` entries) and legacy completions."""

from __future__ import annotations

import functools

from llmserve.core.sampled_token import SampledToken


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-in character -> the byte it encodes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenPieces:
    """Text and bytes of single tokens (bytes exact even when a token splits a UTF-8 character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bytes_of = functools.lru_cache(maxsize=65536)(self._bytes)

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        decoder = _byte_level_decoder()
        if isinstance(piece, str) and piece and all(ch in decoder for ch in piece):
            return bytes(decoder[ch] for ch in piece)
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def text(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="replace")


def chat_logprobs(pieces: TokenPieces, tokens: list[SampledToken]) -> dict:
    """`choices[i].logprobs` of a chat completion (or chunk)."""
    return {"content": [_chat_entry(pieces, t.token_id, t.logprob, t.top_logprobs or []) for t in tokens]}


def _chat_entry(pieces: TokenPieces, token_id: int, logprob: float | None, top: list) -> dict:
    entry = _chat_top(pieces, token_id, logprob)
    entry["top_logprobs"] = [_chat_top(pieces, i, lp) for i, lp in top]
    return entry


def _chat_top(pieces: TokenPieces, token_id: int, logprob: float | None) -> dict:
    return {"token": pieces.text(token_id), "logprob": logprob, "bytes": list(pieces.bytes_of(token_id))}


def prompt_logprobs_entries(pieces: TokenPieces, scored: list[SampledToken], k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs` extension: None for the first prompt token (nothing precedes it), then per
    token {token id as a string: {"logprob", "rank", "decoded_token"}} for it and its k best alternatives."""
    entries: list[dict | None] = [None]
    for token in scored:
        entry = {str(token.token_id): _ranked(pieces, token.token_id, token.logprob, token.rank)}
        for rank, (token_id, logprob) in enumerate((token.top_logprobs or [])[:k], start=1):
            entry.setdefault(str(token_id), _ranked(pieces, token_id, logprob, rank))
        entries.append(entry)
    return entries


def _ranked(pieces: TokenPieces, token_id: int, logprob: float | None, rank: int | None) -> dict:
    return {"logprob": logprob, "rank": rank, "decoded_token": pieces.text(token_id)}


def completion_logprobs(pieces: TokenPieces, tokens: list[SampledToken], text_offset: int) -> dict:
    """`choices[i].logprobs` of a legacy completion: parallel lists; offsets start at `text_offset`.

    Echoed prompt tokens come first: the first with logprob None, the others as scored in the prefill.
    As in OpenAI's API, each `top_logprobs` entry holds up to logprobs + 1 tokens: the top ones and the
    sampled one (so `logprobs: 0` still gives the sampled token's).
    """
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token in tokens:
        text = pieces.text(token.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(token.logprob)
        top = token.top_logprobs
        if top is None:
            out["top_logprobs"].append(None)
        else:
            entries = {pieces.text(i): lp for i, lp in top}
            entries.setdefault(text, token.logprob)
            out["top_logprobs"].append(entries)
        out["text_offset"].append(text_offset)
        text_offset += len(text)
    return out
