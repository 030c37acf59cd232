"""One test per complaint users most often file against peer servers (notes §6)."""

from __future__ import annotations

import asyncio
import copy
import json
import urllib.request

import aiohttp
import openai
import pytest

from llmserve.server.protocol import apply_chat_template
from tests.server_helpers import (SCRIPT_TEXT, make_scripted_engine, make_tiny_engine, metric_values,
                                  start_server, wait_until)

USER = [{"role": "user", "content": "Say your line."}]


@pytest.fixture(scope="module")
def scripted(tokenizer):
    """A server whose model always answers SCRIPT_TEXT and then EOS."""
    server = start_server(make_scripted_engine(tokenizer), served_model_name="scripted")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    server = start_server(make_tiny_engine(tokenizer), served_model_name="tiny")
    yield server
    server.stop()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def _metrics(server) -> dict[str, float]:
    return metric_values(urllib.request.urlopen(server.base_url + "/metrics").read().decode())


def _idle(server) -> bool:
    values = _metrics(server)
    return values["llmserve_kv_blocks_used"] == 0 and values["llmserve_requests_running"] == 0


# ---- 1. a disconnect frees the KV cache ----------------------------------------------------------
async def test_stream_disconnect_aborts_and_frees_kv(tiny):
    before = _metrics(tiny).get('llmserve_requests_total{finish_reason="abort"}', 0)
    body = {"messages": USER, "max_tokens": 900, "ignore_eos": True, "stream": True, "n": 2}
    async with aiohttp.ClientSession() as session:
        response = await session.post(tiny.v1 + "/chat/completions", json=body)
        for _ in range(6):
            await response.content.readline()
        assert _metrics(tiny)["llmserve_kv_blocks_used"] > 0
        response.close()  # drop the connection mid-stream
    aborted = 'llmserve_requests_total{finish_reason="abort"}'
    await asyncio.to_thread(wait_until, lambda: _idle(tiny) and _metrics(tiny).get(aborted) == before + 2)


async def test_non_streaming_disconnect_aborts_and_frees_kv(tiny):
    body = {"messages": USER, "max_tokens": 900, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        async def ask():
            async with session.post(tiny.v1 + "/chat/completions", json=body) as response:
                return await response.json()

        task = asyncio.create_task(ask())
        await asyncio.to_thread(wait_until, lambda: _metrics(tiny)["llmserve_requests_running"] == 1)
        task.cancel()  # the client gives up before the answer
        with pytest.raises(asyncio.CancelledError):
            await task
    await asyncio.to_thread(wait_until, lambda: _idle(tiny))


# ---- 2. usage in streams -----------------------------------------------------------------------------
def test_stream_usage_chunk_is_last_and_others_are_null(scripted, tokenizer):
    chunks = list(_client(scripted).chat.completions.create(
        model="scripted", messages=USER, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(tokenizer.encode(SCRIPT_TEXT)) + 1  # + EOS
    assert all(c.usage is None for c in chunks[:-1])


# ---- 3. UTF-8 in streamed text -----------------------------------------------------------------------
def test_streamed_utf8_is_never_broken_nor_duplicated(scripted, tokenizer):
    script = tokenizer.encode(SCRIPT_TEXT)
    assert any("\ufffd" in tokenizer.decode([t]) for t in script), "the script must split a character"
    chunks = list(_client(scripted).chat.completions.create(model="scripted", messages=USER, stream=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(deltas) == SCRIPT_TEXT
    assert not any("\ufffd" in d for d in deltas)


def test_completions_stream_utf8(scripted):
    chunks = list(_client(scripted).completions.create(model="scripted", prompt="x", max_tokens=50, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == SCRIPT_TEXT


# ---- 5. chat template and BOS ------------------------------------------------------------------------
def _bos_adding(tokenizer):
    """A copy of `tokenizer` whose encode() adds BOS, as LLaMA-style tokenizers do."""
    from tokenizers import processors

    twin = copy.deepcopy(tokenizer)
    twin.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
    return twin


def test_no_double_bos_when_the_template_emits_one(tokenizer):
    bos_adding = _bos_adding(tokenizer)
    templated = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    assert templated.startswith(tokenizer.bos_token), "SmolLM2's template emits its BOS itself"
    assert bos_adding.encode(templated)[:2] == [tokenizer.bos_token_id] * 2  # the trap
    for tok in (tokenizer, bos_adding):
        ids = apply_chat_template(tok, USER)
        assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id


def test_chat_prompt_tokens_are_the_template_tokens(scripted, tokenizer):
    ids = apply_chat_template(tokenizer, USER)
    usage = _client(scripted).chat.completions.create(model="scripted", messages=USER).usage
    assert usage.prompt_tokens == len(ids)
    assert ids == tokenizer.apply_chat_template(USER, add_generation_prompt=True, return_dict=True)["input_ids"]


# ---- 7. chunk correctness -----------------------------------------------------------------------------
async def test_chunks_are_deltas_not_the_whole_text(scripted):
    body = {"messages": USER, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(scripted.v1 + "/chat/completions", json=body) as response:
            frames = [line[6:].strip() for line in (await response.read()).split(b"\n\n") if line]
    chunks = [json.loads(f) for f in frames[:-1]]
    contents = [c["choices"][0]["delta"].get("content") for c in chunks]
    text_deltas = [t for t in contents if t]
    assert len(text_deltas) >= 3 and SCRIPT_TEXT not in text_deltas
    assert "".join(text_deltas) == SCRIPT_TEXT


def test_finish_reason_stop_on_natural_end(scripted):
    client = _client(scripted)
    whole = client.chat.completions.create(model="scripted", messages=USER)
    chunks = list(client.chat.completions.create(model="scripted", messages=USER, stream=True))
    assert whole.choices[0].message.content == SCRIPT_TEXT and whole.choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)


# ---- 8. stop strings stop and are not emitted ---------------------------------------------------
@pytest.mark.parametrize("stop, expected", [("😀", "Hi 日本"), (["é!", "本😀"], "Hi 日"), ("caf", "Hi 日本😀 ")])
def test_stop_strings_end_the_reply_and_never_appear(scripted, stop, expected):
    client = _client(scripted)
    whole = client.chat.completions.create(model="scripted", messages=USER, stop=stop)
    chunks = list(client.chat.completions.create(model="scripted", messages=USER, stop=stop, stream=True))
    deltas = [c.choices[0].delta.content or "" for c in chunks]
    assert whole.choices[0].message.content == "".join(deltas) == expected
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "stop"
    completion = client.completions.create(model="scripted", prompt="x", stop=stop, max_tokens=50)
    assert completion.choices[0].text == expected
