"""IncrementalDetokenizer: deltas add up to the full decode, UTF-8 safe, stop strings held and cut.

Every behaviour is checked with both text decoders: the tokenizers library's DecodeStream (fast
tokenizers) and the window decoder (any tokenizer with `decode`).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmserve.frontend.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from llmserve.frontend.text_decoders import StreamDecoder, WindowDecoder, make_decoder
from tests.helpers_tokenizer import smollm2_tokenizer, tiny_byte_level_tokenizer

TOKENIZER = tiny_byte_level_tokenizer()
VOCAB = len(TOKENIZER)


class DecodeOnly:
    """A tokenizer that only decodes (as a slow, pure-Python one would): the window decoder serves it."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


BOTH = pytest.mark.parametrize("tok", [TOKENIZER, DecodeOnly(TOKENIZER)], ids=["decode_stream", "window"])
ALPHABET = "ab xyz.!\n#<>/é—“日本語東京😀🎉👍🏽"
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def full_decode(tokenizer, ids, skip_special_tokens=True):
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


def stream(detok, ids, chunk_sizes=(1,)):
    """Feed `ids` in chunks (sizes cycle); returns the deltas, finish() last."""
    deltas, i, n = [], 0, 0
    while i < len(ids):
        size = chunk_sizes[n % len(chunk_sizes)]
        deltas.append(detok.add_tokens(ids[i:i + size]))
        i, n = i + size, n + 1
    deltas.append(detok.finish())
    return deltas


def assert_prefixes_of(deltas, final):
    released = ""
    for delta in deltas:
        released += delta
        assert final.startswith(released), f"released {released!r} is not a prefix of {final!r}"


def reference_stop(text, stops, include):
    """What the output should be: cut at the stop string that completes first."""
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not hits:
        return text, None
    _, start, stop = min(hits)
    return text[:start + len(stop)] if include else text[:start], stop


ids_strategy = st.lists(st.integers(0, VOCAB - 1), max_size=40)
chunks_strategy = st.lists(st.integers(1, 4), min_size=1, max_size=5)


@BOTH
@SETTINGS
@given(prompt=st.lists(st.integers(0, VOCAB - 1), max_size=8), ids=ids_strategy, chunks=chunks_strategy,
       skip=st.booleans())
def test_random_ids_stream_to_exact_full_decode(tok, prompt, ids, chunks, skip):
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = stream(detok, ids, chunks)
    expected = full_decode(TOKENIZER, ids, skip)
    assert "".join(deltas) == detok.text == expected
    assert_prefixes_of(deltas, expected)
    assert detok.stop_reason is None


@BOTH
@SETTINGS
@given(text=st.text(alphabet=ALPHABET, max_size=40), chunks=chunks_strategy)
def test_valid_text_never_shows_replacement_char(tok, text, chunks):
    ids = TOKENIZER.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, TOKENIZER.encode("Hi ", add_special_tokens=False))
    deltas = stream(detok, ids, chunks)
    assert "".join(deltas) == text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


@BOTH
def test_split_emoji_is_held_until_complete(tok):
    ids = _one_token_per_byte("😀")
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.add_tokens([i]) for i in ids] == ["", "", "", "😀"]


def _one_token_per_byte(text):
    """Ids of the single-byte tokens spelling `text`'s UTF-8 bytes (every byte is in the vocab)."""
    byte_to_char = _byte_level_chars()
    return [TOKENIZER.convert_tokens_to_ids(byte_to_char[b]) for b in text.encode()]


def _byte_level_chars():
    # GPT-2's byte -> printable-char map, rebuilt from its published rule
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


@BOTH
def test_truncated_emoji_at_the_end_is_flushed_by_finish(tok):
    ids = _one_token_per_byte("ok😀")[:-1]  # last byte never comes
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.add_tokens([i]) for i in ids]
    assert "".join(deltas) == "ok"
    tail = detok.finish()
    assert "ok" + tail == detok.text == full_decode(TOKENIZER, ids)
    assert tail.endswith(REPLACEMENT_CHAR)


@BOTH
def test_prompt_ending_mid_character_does_not_swallow_output_bytes(tok):
    prompt = _one_token_per_byte("x😀")[:-2]
    ids = TOKENIZER.encode(" hello", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    assert "".join(stream(detok, ids)) == " hello"


@BOTH
def test_special_tokens_skipped_or_kept(tok):
    ids = TOKENIZER.encode("a<|im_end|>b", add_special_tokens=False)
    for skip, expected in ((True, "ab"), (False, "a<|im_end|>b")):
        detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip)
        assert "".join(stream(detok, ids)) == expected


@BOTH
@SETTINGS
@given(text=st.text(alphabet=ALPHABET, min_size=1, max_size=40), data=st.data(), chunks=chunks_strategy,
       include=st.booleans())
def test_stop_string_cuts_output_like_reference(tok, text, data, chunks, include):
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start:start + data.draw(st.integers(1, 4))]
    other = data.draw(st.text(alphabet=ALPHABET, min_size=1, max_size=3))
    ids = TOKENIZER.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=[other, stop], include_stop_str_in_output=include)
    deltas = stream(detok, ids, chunks)
    expected, reason = reference_stop(text, [other, stop], include)
    assert "".join(deltas) == detok.text == expected
    assert detok.stop_reason == reason is not None
    assert_prefixes_of(deltas, expected)


@BOTH
@SETTINGS
@given(text=st.text(alphabet=ALPHABET, max_size=30), stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4),
       max_size=3), chunks=chunks_strategy)
def test_text_with_or_without_stops_matches_reference(tok, text, stops, chunks):
    ids = TOKENIZER.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=stops)
    deltas = stream(detok, ids, chunks)
    expected, reason = reference_stop(text, stops, include=False)
    assert "".join(deltas) == detok.text == expected
    assert detok.stop_reason == reason


@BOTH
def test_possible_stop_prefix_is_held_then_released_by_finish(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["</answer>"])
    shown = "".join(detok.add_tokens([i]) for i in TOKENIZER.encode("yes </ans", add_special_tokens=False))
    assert shown == "yes "
    assert detok.finish() == "</ans"
    assert detok.text == "yes </ans" and detok.stop_reason is None


@BOTH
def test_stop_across_tokens_truncates_and_silences(tok):
    ids = TOKENIZER.encode("Hello world! The end", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["ld!"])
    deltas = [detok.add_tokens([i]) for i in ids]
    assert "".join(deltas) == detok.text == "Hello wor"
    assert detok.stop_reason == "ld!"
    assert detok.add_tokens(ids) == "" and detok.finish() == ""


@BOTH
def test_include_stop_str_in_output(tok):
    ids = TOKENIZER.encode("a ### b", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["###"], include_stop_str_in_output=True)
    assert "".join(stream(detok, ids)) == detok.text == "a ###"


@BOTH
def test_stop_that_completes_first_wins(tok):
    ids = TOKENIZER.encode("xabcd", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["abcd", "bc"])
    assert "".join(stream(detok, ids, (5,))) == "xa"
    assert detok.stop_reason == "bc"


@pytest.mark.slow
def test_smollm2_tokenizer_streams_exact_decode():
    tokenizer = smollm2_tokenizer()
    if tokenizer is None:
        pytest.skip("SmolLM2 checkpoint not materialised")
    import random

    rng = random.Random(0)
    text = "Bonjour 😀 — 日本語のテキスト 👍🏽 naïve café.\n```py\nx = 1\n```"
    prompt = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = stream(detok, ids)
    assert "".join(deltas) == text and not any(REPLACEMENT_CHAR in d for d in deltas)
    for _ in range(50):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 30))]
        detok = IncrementalDetokenizer(tokenizer, prompt)
        assert "".join(stream(detok, ids, (rng.randrange(1, 4),))) == full_decode(tokenizer, ids)


def test_fast_tokenizers_decode_with_decode_stream_and_others_with_windows():
    assert isinstance(make_decoder(TOKENIZER, [], True), StreamDecoder)
    assert isinstance(make_decoder(DecodeOnly(TOKENIZER), [], True), WindowDecoder)


def test_stream_decoder_falls_back_to_windows_when_decode_stream_refuses():
    ids = TOKENIZER.encode("Hello 😀 world", add_special_tokens=False)
    decode = lambda token_ids: TOKENIZER.decode(token_ids, skip_special_tokens=True)  # noqa: E731
    decoder = StreamDecoder(object(), decode, [], True)  # DecodeStream refuses a backend that is no Tokenizer
    assert "".join(decoder.step([i]) for i in ids) + decoder.flush() == "Hello 😀 world"


SMOLLM2 = smollm2_tokenizer()
SMOLLM2_SPECIAL_IDS = sorted(SMOLLM2.all_special_ids) if SMOLLM2 is not None else [0]
smollm2_ids = st.lists(st.one_of(st.integers(0, len(SMOLLM2 or TOKENIZER) - 1), st.sampled_from(SMOLLM2_SPECIAL_IDS)),
                       max_size=30)


@pytest.mark.skipif(SMOLLM2 is None, reason="the SmolLM2 checkpoint is not materialised")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=smollm2_ids, ids=smollm2_ids, chunks=chunks_strategy, skip=st.booleans())
def test_decode_stream_equals_full_decode_on_random_smollm2_streams(prompt, ids, chunks, skip):
    detok = IncrementalDetokenizer(SMOLLM2, prompt, skip_special_tokens=skip)
    assert isinstance(detok._decoder, StreamDecoder)
    deltas = stream(detok, ids, chunks)
    expected = full_decode(SMOLLM2, ids, skip)
    assert "".join(deltas) == expected
    assert_prefixes_of(deltas, expected)
