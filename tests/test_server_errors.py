"""Bad input gets an OpenAI-shaped 4xx and never disturbs a request being served meanwhile."""

from __future__ import annotations

import json

import aiohttp
import pytest

from tests.server_helpers import make_tiny_engine, smollm2_tokenizer_or_none, start_server

WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
USER = [{"role": "user", "content": "Tell me a story."}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
LONG = " ".join(["word"] * 1100)  # over the tiny engine's 1024-token context

# (path, body: dict or raw bytes, status, param the error names (None: any))
BAD_INPUTS = [
    (CHAT, b"{not json", 400, None),
    (CHAT, b"[1, 2]", 400, None),
    (CHAT, b"[" * 100_000 + b"]" * 100_000, 400, None),
    (CHAT, b"\xff\xfe{", 400, None),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "temperature"),
    (CHAT, {"model": "tiny"}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": "hello"}, 400, "messages"),
    (CHAT, {"messages": ["hello"]}, 400, "messages[0]"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"content": "x"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content"),
    (CHAT, {"messages": USER, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": USER, "max_tokens": "10"}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "stream": "yes"}, 400, "stream"),
    (CHAT, {"messages": USER, "n": 1.5}, 400, "n"),
    (CHAT, {"messages": USER, "n": True}, 400, "n"),
    (CHAT, {"messages": USER, "stop": 3}, 400, "stop"),
    (CHAT, {"messages": USER, "stop": ["a", 3]}, 400, "stop"),
    (CHAT, {"messages": USER, "seed": 2 ** 70}, 400, "seed"),
    (CHAT, {"messages": USER, "n": 17}, 400, "n"),
    (CHAT, {"messages": USER, "n": 0}, 400, "n"),
    (CHAT, {"messages": USER, "temperature": -1}, 400, "temperature"),
    (CHAT, {"messages": USER, "top_p": 0}, 400, "top_p"),
    (CHAT, {"messages": USER, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {"messages": USER, "top_k": -2}, 400, "top_k"),
    (CHAT, {"messages": USER, "min_p": 2}, 400, "min_p"),
    (CHAT, {"messages": USER, "presence_penalty": 3}, 400, "presence_penalty"),
    (CHAT, {"messages": USER, "frequency_penalty": -3}, 400, "frequency_penalty"),
    (CHAT, {"messages": USER, "repetition_penalty": 0}, 400, "repetition_penalty"),
    (CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "max_completion_tokens": -5}, 400, "max_completion_tokens"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    (CHAT, {"messages": USER, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (CHAT, {"messages": USER, "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    (CHAT, {"messages": USER, "stop": [str(i) for i in range(70_000)]}, 400, "stop"),
    (CHAT, {"messages": USER, "stop": ["s"] * 17}, 400, "stop"),
    (CHAT, {"messages": USER, "stop": ["x" * 257]}, 400, "stop"),
    (CHAT, {"messages": USER, "stop_token_ids": list(range(65))}, 400, "stop_token_ids"),
    (CHAT, {"messages": USER, "repetition_penalty": 1e-46}, 400, "repetition_penalty"),
    (CHAT, {"messages": USER, "repetition_penalty": 1e-40}, 400, "repetition_penalty"),
    (CHAT, {"messages": USER, "repetition_penalty": 1e39}, 400, "repetition_penalty"),
    (CHAT, {"messages": USER, "top_p": 1e-46}, 400, "top_p"),
    (CHAT, {"messages": USER, "top_p": 1e-45}, 400, "top_p"),
    (CHAT, {"messages": USER, "temperature": 1e39}, 400, "temperature"),
    (CHAT, {"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1"}]}]},
     400, "messages[1].tool_calls[0]"),
    (CHAT, {"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     400, "messages[1].tool_calls[0].function.arguments"),
    (CHAT, {"messages": [*USER, {"role": "user", "content": "x", "tool_calls": [TOOL_CALL]}]},
     400, "messages[1].tool_calls"),
    (CHAT, {"messages": [*USER, {"role": "tool", "content": "18 C", "tool_call_id": "call_never_made"}]},
     400, "messages[1].tool_call_id"),
    (CHAT, {"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                         {"role": "tool", "content": "18 C"}]}, 400, "messages[2].tool_call_id"),
    (CHAT, {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools[0]"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "has space"}}]},
     400, "tools[0].function.name"),
    (CHAT, {"messages": USER, "tools": [WEATHER_TOOL, WEATHER_TOOL]}, 400, "tools"),
    (CHAT, {"messages": USER, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     400, "tool_choice"),
    (CHAT, {"messages": USER, "tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, 400, "tool_choice"),
    (CHAT, {"messages": USER, "tool_choice": "required"}, 400, "tool_choice"),
    (CHAT, {"messages": USER, "tools": [WEATHER_TOOL], "parallel_tool_calls": "yes"}, 400, "parallel_tool_calls"),
    (CHAT, {"messages": USER, "tools": [WEATHER_TOOL], "tool_choice": "required",
            "response_format": {"type": "json_object"}}, 400, "response_format"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "if": {}, "then": {}}}}], "tool_choice": "required"},
     400, "tool_choice"),
    (CHAT, {"messages": USER, "response_format": {"type": "xml"}}, 400, "response_format.type"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_schema"}}, 400, "response_format.json_schema"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
     400, "response_format.json_schema.schema"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}}}},
     400, "response_format"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "colour"}}}}}}, 400, "response_format"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "#/definitions/missing"}}}}, 400, "response_format"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_object"}, "guided_regex": "a+"}, 400, "guided_regex"),
    (CHAT, {"messages": USER, "guided_json": "{not json"}, 400, "guided_json"),
    (CHAT, {"messages": USER, "guided_choice": []}, 400, "guided_choice"),
    (CHAT, {"messages": USER, "structured_outputs": {"regex": "a", "choice": ["a"]}}, 400, "structured_outputs"),
    (CHAT, {"messages": USER, "structured_outputs": {"regex": "(unclosed"}}, 400, "structured_outputs"),
    (COMPLETIONS, {"prompt": "x", "structured_outputs": {"grammar": "start: undefined_rule"}}, 400, "structured_outputs"),
    (COMPLETIONS, {"prompt": "x", "guided_grammar": 7}, 400, "guided_grammar"),
    (COMPLETIONS, {"prompt": "x", "tools": [WEATHER_TOOL]}, 400, "tools"),
    (COMPLETIONS, {"prompt": "x", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    (CHAT, {"messages": USER, "prompt_logprobs": -1}, 400, "prompt_logprobs"),
    (CHAT, {"messages": USER, "model": "gpt-4"}, 404, "model"),
    (CHAT, {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    (CHAT, {"messages": USER, "max_tokens": 5000}, 400, "max_tokens"),
    (CHAT, {"messages": USER, "logit_bias": {"5": 100.5}}, 400, "logit_bias"),
    (CHAT, {"messages": USER, "logit_bias": {"5": "high"}}, 400, "logit_bias"),
    (CHAT, {"messages": USER, "logit_bias": {"five": 1}}, 400, "logit_bias"),
    (CHAT, {"messages": USER, "logit_bias": {"-1": 1}}, 400, "logit_bias"),
    (CHAT, {"messages": USER, "logit_bias": {"10000000": 1}}, 400, "logit_bias"),
    (CHAT, {"messages": USER, "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias"),
    (CHAT, {"messages": USER, "logit_bias": [1, 2]}, 400, "logit_bias"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"3": -101}}, 400, "logit_bias"),
    (COMPLETIONS, {"prompt": 5}, 400, "prompt"),
    (COMPLETIONS, {}, 400, "prompt"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [[]]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": ["a", [1, 2]]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [10 ** 9]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [-1]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "echo": "yes"}, 400, "echo"),
    (COMPLETIONS, {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    (COMPLETIONS, {"prompt": LONG}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "x", "model": "nope"}, 404, "model"),
]


@pytest.fixture(scope="module")
def server():
    tokenizer = smollm2_tokenizer_or_none()
    if tokenizer is None:
        pytest.skip("the default model's tokenizer is not materialised")
    server = start_server(make_tiny_engine(tokenizer), served_model_name="tiny")
    yield server
    server.stop()


def assert_openai_error(body: dict, status: int, param: str | None) -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
                             413: "invalid_request_error"}[status]
    if param is not None:
        assert error["param"] == param


async def _post(session, url: str, body) -> aiohttp.ClientResponse:
    if isinstance(body, bytes):
        return await session.post(url, data=body, headers={"Content-Type": "application/json"})
    return await session.post(url, json=body)


async def _frames(response: aiohttp.ClientResponse):
    async for line in response.content:
        if line.startswith(b"data: "):
            yield line[6:].strip()


async def test_every_bad_input_is_refused_while_another_request_streams(server):
    # long enough to outlast the bad requests; under load the server merges tokens into fewer frames
    reference = {"model": "tiny", "messages": USER, "max_tokens": 600, "seed": 3, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(server.base_url + CHAT, json=reference) as response:
            expected = (await response.json())["choices"][0]["message"]["content"]
        background = await session.post(server.base_url + CHAT, json={**reference, "stream": True})
        frames = _frames(background)
        texts = []
        for path, body, status, param in BAD_INPUTS:
            frame = await anext(frames, None)  # the stream moves on between every bad request
            texts += [frame] if frame is not None else []
            async with await _post(session, server.base_url + path, body) as response:
                assert response.status == status, (path, body if isinstance(body, bytes) else list(body))
                assert_openai_error(await response.json(), status, param)
        texts += [frame async for frame in frames]
        background.release()
    chunks = [json.loads(t) for t in texts if t != b"[DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and texts[-1] == b"[DONE]"


async def test_too_long_prompt_names_both_lengths(server):
    async with aiohttp.ClientSession() as session:
        async with session.post(server.base_url + COMPLETIONS, json={"prompt": LONG}) as response:
            error = (await response.json())["error"]
        async with session.post(server.base_url + COMPLETIONS, json={"prompt": "hi", "max_tokens": 1024}) as resp:
            capped = (await resp.json())["error"]
    num_prompt_tokens = len(server.engine.tokenizer.encode(LONG))
    assert response.status == 400 and error["code"] == "context_length_exceeded"
    assert "1024" in error["message"] and str(num_prompt_tokens) in error["message"]
    assert resp.status == 400 and capped["code"] == "context_length_exceeded" and "1024" in capped["message"]


async def test_unknown_route_method_and_oversized_body_are_openai_shaped(server):
    async with aiohttp.ClientSession() as session:
        async with session.get(server.base_url + "/v1/nothing", headers={"x-request-id": "lost-1"}) as response:
            assert response.status == 404 and response.headers["x-request-id"] == "lost-1"
            assert_openai_error(await response.json(), 404, None)
        async with session.get(server.base_url + CHAT) as response:
            assert response.status == 405
            assert_openai_error(await response.json(), 405, None)
        huge = {"messages": [{"role": "user", "content": "x" * (server.config.max_body_bytes + 10)}]}
        async with session.post(server.base_url + CHAT, json=huge) as response:
            assert response.status == 413
            assert_openai_error(await response.json(), 413, None)
        async with session.get(server.base_url + "/health") as response:
            assert response.status == 200


EXTREME_BUT_VALID = [
    {"temperature": 1e-5}, {"temperature": 1e10}, {"temperature": 0, "top_k": 10 ** 9}, {"top_p": 1e-9},
    {"min_p": 1.0}, {"repetition_penalty": 1e30}, {"presence_penalty": -2, "frequency_penalty": 2},
    {"seed": -(2 ** 63)}, {"seed": 2 ** 63 - 1, "n": 16}, {"logprobs": True, "top_logprobs": 20, "n": 3},
    {"min_tokens": 10 ** 9}, {"stop_token_ids": [0, 49151]}, {"stop": ["", "x" * 256, *"abcdefghijklmn"]},
    {"stop_token_ids": list(range(64))}, {"repetition_penalty": 1.2e-38}, {"top_p": 1.2e-38}, {"temperature": 3e38},
    {"messages": [*USER, {"role": "assistant", "content": None}, {"role": "user", "content": "Go on."}]},
    {"max_completion_tokens": 2, "max_tokens": 9}, {"user": "someone", "ignore_eos": False},
]


async def test_extreme_but_valid_values_are_served(server):
    async with aiohttp.ClientSession() as session:
        for fields in EXTREME_BUT_VALID:
            body = {"messages": USER, "max_tokens": 4, **fields}
            async with session.post(server.base_url + CHAT, json=body) as response:
                assert response.status == 200, (fields, await response.text())
                choices = (await response.json())["choices"]
            assert len(choices) == fields.get("n", 1)
            assert all(len(c["message"]["content"]) >= 0 and c["finish_reason"] for c in choices)
        async with session.post(server.base_url + CHAT, json={"messages": USER, "max_tokens": 3}) as response:
            assert response.status == 200 and (await response.json())["usage"]["completion_tokens"] == 3
