"""Tool calling: tools in the prompt, calls parsed from the output (streamed deltas add up to the whole
message), forced calls held to the function's schema, and tool results accepted back."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmserve.server.errors import APIError
from llmserve.server.protocol import Limits, parse_chat
from llmserve.server.tool_parser import ToolCallParser
from llmserve.server.tools import parse_tools

WEATHER_PARAMS = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                  "properties": {"city": {"type": "string", "maxLength": 20},
                                 "unit": {"enum": ["celsius", "fahrenheit"]}}}
TIME_PARAMS = {"type": "object", "additionalProperties": False, "required": ["timezone"],
               "properties": {"timezone": {"type": "string", "maxLength": 30}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                           "parameters": TIME_PARAMS}}]
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]

OUTPUTS = [
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    '</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"a": "x}\\"y\\\\", "b": [1, {"c": "]"}]}}\n</tool_call>\n'
    '<tool_call>\n{"arguments": {"z": 1}, "name": "g"}\n</tool_call>',
    'no call here, just a < sign and <tool_ but not a block',
    '<tool_call>\n{"name": "broken", "argu',  # cut off by max_tokens
    '<tool_call>\nnot json at all\n</tool_call> then text',
]


def _reassemble(deltas: list[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            entry = calls.setdefault(call["index"], [None, ""])
            if "id" in call:  # the first delta of a call names it, with empty arguments
                assert entry[0] is None and call["function"]["arguments"] == "" and call["type"] == "function"
                entry[0] = call["function"]["name"]
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
            entry[1] += call["function"]["arguments"]
    return content, [tuple(calls[i]) for i in sorted(calls)]


def _whole(text: str) -> tuple[str | None, list[tuple[str, str]]]:
    parser = ToolCallParser()
    parser.feed(text)
    parser.finish()
    content, calls = parser.message()
    return content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(OUTPUTS), st.lists(st.integers(1, 7), min_size=1, max_size=200))
def test_streamed_deltas_add_up_to_the_whole_message(text, sizes):
    parser, deltas, start = ToolCallParser(), [], 0
    for size in sizes:
        deltas += parser.feed(text[start:start + size])
        start += size
    deltas += parser.feed(text[start:])
    deltas += parser.finish()
    content, calls = _reassemble(deltas)
    whole_content, whole_calls = _whole(text)
    assert (content or None if calls else content) == whole_content
    assert calls == whole_calls


def test_what_the_parser_reads():
    content, calls = _whole(OUTPUTS[1])
    assert content is None
    assert calls == [("f", '{"a": "x}\\"y\\\\", "b": [1, {"c": "]"}]}'), ("g", '{"z": 1}')]
    assert _whole(OUTPUTS[0]) == ("Let me check.\n", [("get_weather", '{"city": "Paris", "unit": "celsius"}')])
    assert _whole(OUTPUTS[2]) == (OUTPUTS[2], [])
    assert _whole(OUTPUTS[4]) == (OUTPUTS[4], [])  # not a call: left as text


@pytest.mark.parametrize("body, param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}}, "tool_choice"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
])
def test_bad_tools_are_refused(body, param):
    with pytest.raises(APIError) as caught:
        parse_tools(body)
    assert caught.value.status == 400 and caught.value.param == param


def test_an_empty_tool_calls_list_means_no_calls(tokenizer):
    limits = Limits(vocab_size=len(tokenizer), max_n=4, max_prompts=4)
    messages = ASK + [{"role": "assistant", "content": "Sunny.", "tool_calls": []}, {"role": "user", "content": "Thanks"}]
    plain = ASK + [{"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Thanks"}]
    assert parse_chat({"messages": messages}, tokenizer, limits).prompts == parse_chat({"messages": plain}, tokenizer,
                                                                                         limits).prompts


def test_tool_choice_none_offers_no_tools():
    assert parse_tools({"tools": TOOLS, "tool_choice": "none"}) is None


NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_renders_tools_gets_them_and_the_history(tokenizer):
    native = copy.copy(tokenizer)
    native.chat_template = NATIVE_TEMPLATE
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]
    limits = Limits(vocab_size=len(tokenizer), max_n=4, max_prompts=4)
    prompt = native.decode(parse_chat({"messages": messages, "tools": TOOLS}, native, limits).prompts[0])
    assert "TOOLS: get_weather get_time" in prompt
    assert 'CALL get_weather {"city": "Paris"}' in prompt and "<|im_start|>tool\n18 C and sunny" in prompt
    # the default model's template does not render tools: they go in a system message of ours
    fallback = tokenizer.decode(parse_chat({"messages": messages, "tools": TOOLS}, tokenizer, limits).prompts[0])
    assert '"name": "get_time"' in fallback and "<tool_response>\n18 C and sunny\n</tool_response>" in fallback
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in fallback


# ---- through the API, with the default model ---------------------------------------------
@pytest.fixture(scope="module")
def client():
    import openai

    from llmserve.config import EngineConfig
    from llmserve.engine.engine import Engine
    from tests.server_helpers import start_server

    server = start_server(Engine.from_config(EngineConfig(model="default"), progress=lambda m: None))
    yield openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    server.stop()


def _stream_message(client, **body) -> tuple[str | None, list[tuple[str, str]], str]:
    deltas, finish_reason = [], None
    for chunk in client.chat.completions.create(**body, stream=True):
        for choice in chunk.choices:
            delta = choice.delta.model_dump(exclude_none=True)
            delta.pop("role", None)
            deltas.append(delta)
            finish_reason = choice.finish_reason or finish_reason
    content, calls = _reassemble(deltas)
    return content or None, calls, finish_reason


@pytest.mark.slow
@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_a_forced_call_has_valid_arguments_and_streams_the_same(client, tool_choice):
    body = dict(model="default", messages=ASK, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False,
                max_tokens=100, temperature=0)
    choice = client.chat.completions.create(**body).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    schema = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_weather"
    content, calls, finish_reason = _stream_message(client, **body)
    assert (content, calls, finish_reason) == (None, [(call.function.name, call.function.arguments)], "tool_calls")


@pytest.mark.slow
def test_parallel_calls_when_required(client):
    for seed in range(2):
        choice = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Weather in Paris and Rome, and the time in Tokyo?"}],
            tools=TOOLS, tool_choice="required", max_tokens=200, temperature=0.7, seed=seed).choices[0]
        assert choice.message.tool_calls, choice
        for call in choice.message.tool_calls:  # every complete call is valid, however many were made
            if choice.finish_reason == "tool_calls" or call is not choice.message.tool_calls[-1]:
                schema = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}[call.function.name]
                jsonschema.validate(json.loads(call.function.arguments), schema)
        assert len({call.id for call in choice.message.tool_calls}) == len(choice.message.tool_calls)


@pytest.mark.slow
def test_a_follow_up_turn_with_the_tool_result_is_answered(client):
    first = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, max_tokens=100, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "sunny"}'}]
    answer = client.chat.completions.create(model="default", messages=messages, tools=TOOLS, max_tokens=40,
                                            temperature=0, tool_choice="none")
    choice = answer.choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")


@pytest.mark.slow
def test_auto_gives_text_or_calls_consistently(client):
    for stream in (False, True):
        body = dict(model="default", messages=ASK, tools=TOOLS, max_tokens=60, temperature=0)
        if stream:
            content, calls, finish_reason = _stream_message(client, **body)
        else:
            choice = client.chat.completions.create(**body).choices[0]
            content, finish_reason = choice.message.content, choice.finish_reason
            calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        assert content or calls
        assert (finish_reason == "tool_calls") == bool(calls and finish_reason != "length")
