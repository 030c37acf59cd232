"""`llmserve chat` against a real server whose model always says SCRIPT_TEXT."""

from __future__ import annotations

import pytest

from llmserve.server.chat_client import ChatClientConfig, ChatSession, _turn, run_chat
from tests.server_helpers import SCRIPT_TEXT, make_scripted_engine, smollm2_tokenizer_or_none, start_server


@pytest.fixture(scope="module")
def server():
    tokenizer = smollm2_tokenizer_or_none()
    if tokenizer is None:
        pytest.skip("the default model's tokenizer is not materialised")
    server = start_server(make_scripted_engine(tokenizer), served_model_name="scripted", api_key="k")
    yield server
    server.stop()


def test_chat_streams_replies_until_exit(server):
    lines = iter(["hello", "", "/help", "again", "/exit", "never read"])
    out = []
    code = run_chat(ChatClientConfig(base_url=server.v1, api_key="k"), read_line=lambda _: next(lines),
                    write=out.append)
    text = "".join(out)
    assert code == 0 and "chatting with scripted" in text
    assert text.count(f"assistant> {SCRIPT_TEXT}\n") == 2
    assert next(lines) == "never read"


def test_chat_keeps_history_and_reset_forgets_it(server):
    config = ChatClientConfig(base_url=server.v1, api_key="k", model="scripted", system="Be brief.")
    chat = ChatSession(config.system)
    for line in ["one", "two"]:
        _turn(config, "scripted", chat, line, write=lambda _: None)
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[2]["content"] == SCRIPT_TEXT
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]


def test_chat_reports_an_unreachable_server():
    out = []
    assert run_chat(ChatClientConfig(base_url="http://127.0.0.1:9/v1"), read_line=input, write=out.append) == 1
    assert "cannot reach" in "".join(out)


def test_chat_reports_a_bad_key(server):
    out = []
    assert run_chat(ChatClientConfig(base_url=server.v1, api_key="wrong"), read_line=input, write=out.append) == 1
    assert "401" in "".join(out)
