"""Admission under bursts: `--max-waiting` holds however many requests arrive at once."""

from __future__ import annotations

import asyncio
import threading

import aiohttp
import pytest

from llmserve.server.state import MODELS
from tests.server_helpers import make_tiny_engine, metric_values, start_server, wait_until

MAX_WAITING = 4
CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 8,
        "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tokenizer):
    # two sequences run at a time, so a burst has to queue and the queue limit decides
    server = start_server(make_tiny_engine(tokenizer, max_num_seqs=2), served_model_name="tiny",
                          max_waiting=MAX_WAITING)
    yield server
    server.stop()


def _model(server):
    return server.app[MODELS].ready()[0]


class PeakSampler:
    """Reads the engine's waiting count on every turn of the server's event loop, from inside it."""

    def __init__(self, server):
        self.server, self.peak, self._done = server, 0, threading.Event()

    def __enter__(self) -> "PeakSampler":
        self._future = asyncio.run_coroutine_threadsafe(self._sample(), self.server.loop)
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._future.result(10)

    async def _sample(self) -> None:
        model = _model(self.server)
        while not self._done.is_set():
            self.peak = max(self.peak, model.num_waiting)
            await asyncio.sleep(0)


async def _chat(session, url: str) -> tuple[int, dict, dict]:
    async with session.post(url + CHAT, json=BODY) as response:
        return response.status, dict(response.headers), await response.json()


async def _scrape_waiting(session, url: str, num_scrapes: int) -> list[float]:
    values = []
    for _ in range(num_scrapes):
        async with session.get(url + "/metrics") as response:
            values.append(metric_values(await response.text())["llmserve_requests_waiting"])
        await asyncio.sleep(0.01)
    return values


@pytest.mark.parametrize("burst", [64, 200])
async def test_burst_never_exceeds_max_waiting(server, burst):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        _, _, reference = await _chat(session, server.base_url)
        with PeakSampler(server) as sampler:
            scraped = asyncio.create_task(_scrape_waiting(session, server.base_url, 20))
            results = await asyncio.gather(*(_chat(session, server.base_url) for _ in range(burst)))
            scraped = await scraped
    assert sampler.peak <= MAX_WAITING and max(scraped) <= MAX_WAITING, (sampler.peak, scraped)
    served = [body for status, _, body in results if status == 200]
    refused = [(headers, body) for status, headers, body in results if status == 429]
    assert len(served) + len(refused) == burst, sorted({status for status, _, _ in results})
    assert len(served) >= MAX_WAITING and refused, (len(served), len(refused))
    expected = reference["choices"][0]["message"]["content"]
    for body in served:
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["choices"][0]["message"]["content"] == expected
    for headers, body in refused:
        assert headers["Retry-After"] == "1"
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "too_many_requests"
    wait_until(lambda: _model(server).num_waiting == 0 and _model(server).num_reserved == 0)


async def test_cancelled_clients_give_back_every_reserved_slot(server):
    timeout = aiohttp.ClientTimeout(total=0.05)  # most give up before, or while, their request runs
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        results = await asyncio.gather(*(_chat(session, server.base_url) for _ in range(40)),
                                       return_exceptions=True)
    assert any(isinstance(r, asyncio.TimeoutError) for r in results)
    model = _model(server)
    wait_until(lambda: model.num_reserved == 0 and model.num_waiting == 0 and model.engine.stats().num_running == 0)
    async with aiohttp.ClientSession() as session:
        status, _, body = await _chat(session, server.base_url)
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("fields, num_choices", [({"n": 5}, 5), ({"n": 3, "prompt": ["a", "b"]}, 6)])
async def test_more_choices_than_max_waiting_is_a_400_naming_the_limit(server, fields, num_choices):
    path = "/v1/completions" if "prompt" in fields else CHAT
    body = {**BODY, **fields} if path == CHAT else {"model": "tiny", "max_tokens": 2, **fields}
    async with aiohttp.ClientSession() as session:
        async with session.post(server.base_url + path, json=body) as response:
            error = (await response.json())["error"]
    assert response.status == 400 and "Retry-After" not in response.headers
    assert error["param"] == "n" and error["code"] == "too_many_choices"
    assert f"{num_choices} completions" in error["message"] and f"at most {MAX_WAITING}" in error["message"]


async def test_as_many_choices_as_max_waiting_are_served(server):
    async with aiohttp.ClientSession() as session:
        async with session.post(server.base_url + CHAT, json={**BODY, "n": MAX_WAITING}) as response:
            body = await response.json()
    assert response.status == 200 and len(body["choices"]) == MAX_WAITING
