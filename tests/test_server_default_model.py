"""32 concurrent streaming clients on the real default model, half of them hanging up mid-stream."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import aiohttp
import pytest

from tests.server_helpers import free_port, metric_values, start_server, wait_until

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?",
           "Give me a tip for learning to program."]
NUM_CLIENTS, NUM_LEAVING, MAX_TOKENS = 32, 16, 24


@pytest.fixture(scope="session")
def default_server():
    from llmserve.config import EngineConfig
    from llmserve.engine.engine import Engine

    server = start_server(Engine.from_config(EngineConfig(model="default"), progress=lambda m: None))
    yield server
    server.stop()


def _metrics(server) -> dict[str, float]:
    return metric_values(urllib.request.urlopen(server.base_url + "/metrics").read().decode())


def _body(prompt: str, stream: bool) -> dict:
    return {"model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": stream, "stream_options": {"include_usage": True} if stream else None}


async def _client(session, url: str, prompt: str, leave_after: int | None) -> dict:
    """Stream one reply; hang up after `leave_after` content chunks, or read to [DONE]."""
    chunks, text = [], ""
    async with session.post(url, json=_body(prompt, True)) as response:
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                return {"chunks": chunks, "text": text, "done": True}
            chunk = json.loads(line[6:])
            chunks.append(chunk)
            if chunk["choices"]:
                text += chunk["choices"][0]["delta"].get("content") or ""
            if leave_after is not None and len(chunks) > leave_after:
                response.close()
                return {"chunks": chunks, "text": text, "done": False}
    return {"chunks": chunks, "text": text, "done": False}


async def test_32_streams_16_hang_up_rest_complete_and_kv_is_freed(default_server):
    url = default_server.v1 + "/chat/completions"
    async with aiohttp.ClientSession() as session:
        expected = {}
        for prompt in PROMPTS:  # greedy replies, one at a time: what every batch must reproduce
            async with session.post(url, json=_body(prompt, False)) as response:
                expected[prompt] = (await response.json())["choices"][0]["message"]["content"]
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(NUM_CLIENTS)]
        leave = [3 if i % 2 else None for i in range(NUM_CLIENTS)]  # every other client hangs up
        results = await asyncio.gather(*[_client(session, url, p, k) for p, k in zip(prompts, leave)])

    assert sum(1 for r in results if not r["done"]) == NUM_LEAVING
    for prompt, result, left in zip(prompts, results, leave):
        if left is not None:
            continue
        chunks = result["chunks"]
        assert result["done"] and result["text"] == expected[prompt]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= MAX_TOKENS
    await asyncio.to_thread(wait_until, lambda: _metrics(default_server)["llmserve_kv_blocks_used"] == 0)
    values = _metrics(default_server)
    assert values["llmserve_requests_running"] == 0 and values["llmserve_requests_waiting"] == 0


def test_cli_serve_then_chat_then_sigint():
    import signal
    import subprocess
    import sys

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "llmserve.cli", "serve", "--model", "default", "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def healthy() -> bool:
            assert server.poll() is None, server.stderr.read()
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health").status == 200
            except OSError:
                return False

        wait_until(healthy, timeout=120, interval=0.5)
        chat = subprocess.run([sys.executable, "-m", "llmserve.cli", "chat", "--base-url",
                               f"http://127.0.0.1:{port}/v1", "--max-tokens", "8", "--temperature", "0"],
                              input="What is 2 + 2?\n/exit\n", capture_output=True, text=True, timeout=120)
        assert chat.returncode == 0, chat.stderr
        assert "chatting with smollm2-135m-instruct" in chat.stdout and "assistant> " in chat.stdout
    finally:
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=60)
    assert server.returncode == 0, stderr
    assert f"clients use base_url http://127.0.0.1:{port}/v1" in stderr
    # on CPU `serve --model default` serves the weight-only INT8 conversion (README: fast by default)
    assert "model 'smollm2-135m-instruct' (also 'default'): device cpu, dtype float32, quantization W8A16" in stderr
    access = [json.loads(line.split("llmserve.access: ", 1)[1]) for line in stderr.splitlines()
              if "llmserve.access: " in line]
    assert any(a["path"] == "/v1/chat/completions" and a["status"] == 200 for a in access)


@pytest.mark.parametrize("flags, fast", [([], True), (["--dtype", "float32"], False), (["--quantization", "int8"], False),
                                         (["--device", "cuda"], False), (["--model", "/models/x"], False),
                                         (["--tp", "2"], False)])
def test_only_a_plain_cpu_serve_of_the_default_model_gets_the_fast_default(flags, fast):
    from llmserve.cli import build_parser
    from llmserve.server.cli import uses_fast_cpu_default

    assert uses_fast_cpu_default(build_parser().parse_args(["serve", *flags])) is fast
