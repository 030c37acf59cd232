"""Large prompts are tokenized off the event loop: /health keeps answering while one is encoded."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from llmserve.server.tokenizing import TokenizingWorker
from tests.server_helpers import health_latencies, make_tiny_engine, start_server

HUGE_PROMPT = "The quick brown fox jumps over the lazy dog. 日本語のテキスト " * 20_000  # 1.3 MB, 1 s to encode


async def test_health_answers_quickly_while_a_huge_prompt_is_tokenized(tokenizer):
    server = start_server(make_tiny_engine(tokenizer, num_blocks=64), max_body_bytes=8 << 20)
    try:
        async with aiohttp.ClientSession() as session:
            huge = asyncio.ensure_future(session.post(server.v1 + "/completions",
                                                      json={"prompt": HUGE_PROMPT, "max_tokens": 1}))
            started = time.monotonic()
            latencies = await health_latencies(session, server.base_url, huge.done)
            response = await huge
            tokenized_for = time.monotonic() - started
            error = (await response.json())["error"]
    finally:
        server.stop()
    assert response.status == 400 and error["code"] == "context_length_exceeded"  # it was tokenized, then refused
    assert len(latencies) >= 3, (tokenized_for, latencies)  # /health was asked while the prompt was encoded
    assert max(latencies) < 0.75, (tokenized_for, latencies)  # encoding on the loop would hold it ~1 s


async def test_small_jobs_run_inline_and_wait_behind_a_job_on_the_thread():
    worker = TokenizingWorker(inline_max_bytes=100)
    loop_thread = asyncio.current_task()
    assert await worker.run(10, lambda: asyncio.current_task() is loop_thread)  # inline: on the loop's thread

    finished = []

    def slow() -> None:
        time.sleep(0.2)
        finished.append("big")

    big = asyncio.ensure_future(worker.run(1000, slow))
    await asyncio.sleep(0.01)
    await asyncio.gather(big, worker.run(10, lambda: finished.append("small")))  # the thread is busy: it queues
    assert finished == ["big", "small"]
    worker.shutdown()
