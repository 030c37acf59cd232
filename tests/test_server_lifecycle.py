"""Readiness, API keys, backpressure, access log and graceful shutdown of a real server."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request

import aiohttp
import openai
import pytest
from aiohttp.test_utils import make_mocked_request

from llmserve.server.app import create_app
from llmserve.server.config import ServerConfig
from llmserve.server.routes import health
from llmserve.server.state import SHUTTING_DOWN
from tests.server_helpers import engine_client, make_tiny_engine, metric_values, start_server, wait_until

USER = [{"role": "user", "content": "Hello there."}]


def _get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _metrics(server) -> dict[str, float]:
    return metric_values(_get(server.base_url + "/metrics")[1].decode())


async def test_health_is_503_until_the_engine_loop_runs(tokenizer):
    engine = engine_client(make_tiny_engine(tokenizer, num_blocks=16))
    app = create_app(ServerConfig(port=0), engine)
    assert (await health(make_mocked_request("GET", "/health", app=app))).status == 503
    await engine.start()
    assert (await health(make_mocked_request("GET", "/health", app=app))).status == 200
    await engine.stop()


def test_api_key_required_except_for_health_and_metrics(tokenizer):
    server = start_server(make_tiny_engine(tokenizer, num_blocks=32), api_key="s3cret")
    try:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}]:
            status, body = _get(server.v1 + "/models", headers)
            assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
        assert _get(server.v1 + "/models", {"Authorization": "Bearer s3cret"})[0] == 200
        assert _get(server.base_url + "/health")[0] == 200 and _get(server.base_url + "/metrics")[0] == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.v1, api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=server.v1, api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="default", messages=USER, max_tokens=2).usage.completion_tokens == 2
    finally:
        server.stop()


async def test_full_waiting_queue_gives_429_with_retry_after(tokenizer):
    server = start_server(make_tiny_engine(tokenizer, max_num_seqs=1), max_waiting=1)
    long = {"messages": USER, "max_tokens": 900, "ignore_eos": True, "stream": True}
    try:
        async with aiohttp.ClientSession() as session:
            running = await session.post(server.v1 + "/chat/completions", json=long)
            assert running.status == 200
            await running.content.readline()
            # it holds the only running seat once the core took it (until then it counts as waiting)
            await asyncio.to_thread(wait_until, lambda: _metrics(server)["llmserve_requests_running"] == 1)
            waiting = await session.post(server.v1 + "/chat/completions", json={**long, "max_tokens": 3})
            await asyncio.to_thread(wait_until, lambda: _metrics(server)["llmserve_requests_waiting"] == 1)
            async with session.post(server.v1 + "/chat/completions", json={"messages": USER}) as refused:
                assert refused.status == 429 and int(refused.headers["Retry-After"]) >= 1
                assert (await refused.json())["error"]["type"] == "rate_limit_error"
            running.close()  # the seat frees, the waiting request runs to its end
            text = await waiting.text()
            assert waiting.status == 200 and text.endswith("data: [DONE]\n\n") and '"finish_reason":"length"' in text
    finally:
        server.stop()


def test_access_log_has_timings_but_no_prompt_nor_key(tokenizer, caplog):
    server = start_server(make_tiny_engine(tokenizer, num_blocks=32), api_key="key-XYZ")
    secret = "my-private-prompt-text"
    try:
        with caplog.at_level(logging.INFO, logger="llmserve.access"):
            client = openai.OpenAI(base_url=server.v1, api_key="key-XYZ", max_retries=0)
            client.chat.completions.create(model="default", messages=[{"role": "user", "content": secret}],
                                           max_tokens=3, extra_headers={"x-request-id": "req-42"})
            wait_until(lambda: any("req-42" in r.getMessage() for r in caplog.records))
    finally:
        server.stop()
    line = json.loads(next(r.getMessage() for r in caplog.records if "req-42" in r.getMessage()))
    assert line["status"] == 200 and line["path"] == "/v1/chat/completions" and line["output_tokens"] == 3
    assert line["prompt_tokens"] > 0 and 0 <= line["ttft_s"] <= line["duration_s"]
    assert not any(secret in r.getMessage() or "key-XYZ" in r.getMessage() for r in caplog.records)


# The shutdown tests below read the engine's pool after the server stopped, so their core runs in this process;
# a core process's stop with streams in flight is tested in test_mp_server.py.
def test_shutdown_lets_in_flight_requests_finish(tokenizer):
    server = start_server(make_tiny_engine(tokenizer), core_mode="inproc", shutdown_timeout=60)
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="default", messages=USER, max_tokens=40, stream=True,
                                            extra_body={"ignore_eos": True})
    first = next(iter(stream))
    server.begin_stop()
    chunks = [first, *stream]
    server.stop()
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in chunks if c.choices[0].delta.content is not None) >= 2
    assert server.engine.kv.num_used_blocks == 0


async def test_shutdown_deadline_aborts_and_closes_open_streams(tokenizer):
    server = start_server(make_tiny_engine(tokenizer), core_mode="inproc", shutdown_timeout=0.2)
    body = {"messages": USER, "max_tokens": 900, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(server.v1 + "/chat/completions", json=body)
        assert response.status == 200
        await response.content.readline()
        server.begin_stop()
        text = (await response.read()).decode()
    await asyncio.to_thread(server.stop)
    assert text.endswith("data: [DONE]\n\n")
    error = json.loads(text.split("\n\n")[-3][len("data: "):])["error"]
    assert error["code"] == "shutting_down"
    assert server.engine.kv.num_used_blocks == 0 and not server.engine.has_unfinished_requests()


async def test_second_signal_aborts_in_flight_requests_without_waiting_for_the_deadline(tokenizer):
    server = start_server(make_tiny_engine(tokenizer), core_mode="inproc", shutdown_timeout=60)
    body = {"messages": USER, "max_tokens": 900, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(server.v1 + "/chat/completions", json=body)
        await response.content.readline()
        server.begin_stop()
        await asyncio.to_thread(wait_until, lambda: server.app[SHUTTING_DOWN].is_set())
        server.abort_inflight()
        text = (await asyncio.wait_for(response.read(), 10)).decode()
    await asyncio.wait_for(asyncio.to_thread(server.stop), 10)
    error = json.loads(text.split("\n\n")[-3][len("data: "):])["error"]
    assert error["code"] == "shutting_down" and text.endswith("data: [DONE]\n\n")
    assert server.engine.kv.num_used_blocks == 0
