"""Timeouts: a body that never arrives, headers that never end, silent streams, requests stuck in the queue."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import pytest

from tests.server_helpers import make_tiny_engine, metric_values, start_server

USER = [{"role": "user", "content": "Hello there."}]
LONG = {"messages": USER, "max_tokens": 900, "ignore_eos": True, "stream": True}


def _connect(server) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


async def _metrics(session, server) -> dict[str, float]:
    async with session.get(server.base_url + "/metrics") as response:
        return metric_values(await response.text())


@pytest.fixture(scope="module")
def quick_timeouts(tokenizer):
    server = start_server(make_tiny_engine(tokenizer, num_blocks=64), body_timeout=0.5, keepalive_timeout=1.0)
    yield server
    server.stop()


def test_body_that_never_arrives_gets_408_and_the_connection_closes(quick_timeouts):
    sock = _connect(quick_timeouts)
    started = time.monotonic()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 200\r\n\r\n{\"prompt\": \"Hi\", ")
    head, _, body = sock.recv(65536).partition(b"\r\n\r\n")
    elapsed = time.monotonic() - started
    sock.close()
    assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head
    assert 0.4 < elapsed < 5
    error = json.loads(body)["error"]
    assert error["code"] == "body_timeout" and error["type"] == "invalid_request_error"
    assert "0.5 s" in error["message"]


def test_headers_that_never_end_are_cut_at_the_keepalive_timeout(quick_timeouts):
    sock = _connect(quick_timeouts)
    started = time.monotonic()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n")  # and nothing more
    assert _read_until_closed(sock) == b""
    assert time.monotonic() - started < 5
    sock.close()


def test_an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(quick_timeouts):
    sock = _connect(quick_timeouts)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    started = time.monotonic()
    response = _read_until_closed(sock)
    assert response.startswith(b"HTTP/1.1 200 ") and 0.8 < time.monotonic() - started < 5
    sock.close()


async def test_a_queued_stream_gets_keepalive_comments_then_its_tokens(tokenizer):
    server = start_server(make_tiny_engine(tokenizer, max_num_seqs=1), sse_keepalive_s=0.1)
    try:
        async with aiohttp.ClientSession() as session:
            running = await session.post(server.v1 + "/chat/completions", json=LONG)
            await running.content.readline()  # it holds the only running seat
            queued = await session.post(server.v1 + "/chat/completions", json={**LONG, "max_tokens": 3})
            lines = [await asyncio.wait_for(queued.content.readline(), 5) for _ in range(6)]  # role delta, silence
            running.close()
            lines += [line async for line in queued.content]
    finally:
        server.stop()
    assert lines.count(b": keep-alive\n") >= 2
    assert lines.index(b": keep-alive\n") < next(i for i, line in enumerate(lines) if b'"content":"' in line
                                                 and b'"content":""' not in line)
    frames = [line[len(b"data: "):].strip() for line in lines if line.startswith(b"data: ")]
    assert frames[-1] == b"[DONE]"
    assert json.loads(frames[-2])["choices"][0]["finish_reason"] == "length"


async def test_queue_timeout_ends_waiting_requests_but_never_a_running_one(tokenizer):
    server = start_server(make_tiny_engine(tokenizer, max_num_seqs=1), queue_timeout=0.3)
    try:
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            running = await session.post(server.v1 + "/chat/completions", json={**LONG, "max_tokens": 400})
            await running.content.readline()
            waiting_whole = session.post(server.v1 + "/chat/completions", json={"messages": USER, "max_tokens": 3})
            waiting_stream = session.post(server.v1 + "/chat/completions", json={**LONG, "max_tokens": 3})
            whole, stream = await asyncio.gather(waiting_whole, waiting_stream)
            whole_body, stream_text = await whole.json(), await stream.text()
            values = await _metrics(session, server)
            running_text = await running.text()
            elapsed = time.monotonic() - started
            deadline = time.monotonic() + 20
            while (await _metrics(session, server))["llmserve_kv_blocks_used"] != 0:
                assert time.monotonic() < deadline, "KV blocks still in use 20 s after the requests ended"
                await asyncio.sleep(0.05)
    finally:
        server.stop()
    assert whole.status == 503 and whole_body["error"]["code"] == "queue_timeout"
    assert "0.3 s" in whole_body["error"]["message"] and whole.headers["Retry-After"] == "1"
    assert stream.status == 200 and stream_text.endswith("data: [DONE]\n\n")
    assert json.loads(stream_text.split("\n\n")[-3][len("data: "):])["error"]["code"] == "queue_timeout"
    assert values["llmserve_requests_waiting"] == 0 and values["llmserve_requests_running"] == 1
    assert elapsed > 0.3 and '"finish_reason":"length"' in running_text  # ran past the timeout, untouched
