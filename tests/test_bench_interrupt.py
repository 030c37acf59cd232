"""Ctrl-C in `llmserve bench serve`: the run stops, requests in flight are cancelled, a partial result is written."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from llmserve.bench.client import EndpointConfig
from llmserve.bench.datasets import BenchRequest
from llmserve.bench.load import LoadConfig, run_load
from tests.fake_openai_server import FakeOpenAIServer, FakeScript, server_in_thread

REPO = Path(__file__).resolve().parents[1]


def requests_of(num: int, max_tokens: int) -> list[BenchRequest]:
    return [BenchRequest("Hello there", max_tokens, None) for _ in range(num)]


def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_sigint_writes_a_partial_result_and_exits_130(tmp_path):
    out, html = tmp_path / "run.json", tmp_path / "run.html"
    # 60 requests of ~0.45 s, three at a time: ~9 s if left alone.
    with server_in_thread(FakeScript(first_delay=0.05, gap=0.02)) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmserve.cli", "bench", "serve", "--base-url", server.base_url, "--model", "m",
             "--endpoint", "completions", "--dataset", "random", "--num-prompts", "60", "--input-len-min", "4",
             "--input-len-max", "8", "--output-len", "20", "--concurrency", "3", "--no-progress",
             "--out", str(out), "--html", str(html)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: server.num_requests >= 7, timeout=30)  # so at least 4 have completed
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
            proc.send_signal(signal.SIGINT)  # an impatient second Ctrl-C must not spoil the partial result
            stdout, stderr = proc.communicate(timeout=20)
        finally:
            proc.kill()
        num_seen_by_server = server.num_requests
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"partial result written to {out} and {html}" in stderr
    result = json.loads(out.read_text())
    run = result["runs"][0]
    counts = run["requests"]
    assert result["interrupted"] is True and run["interrupted"] is True
    assert counts["completed"] == len(run["records"]) >= 4 and counts["failed"] == 0
    assert all(record["error_kind"] is None and record["output_tokens"] == 20 for record in run["records"])
    assert 1 <= counts["cancelled_in_flight"] <= 3 and counts["not_started"] > 0
    assert counts["planned"] == 60 == counts["completed"] + counts["cancelled"]
    assert counts["completed"] <= num_seen_by_server <= counts["submitted"] < 60
    assert "INTERRUPTED" in stdout and "Partial result" in html.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.html", "run.json"]  # no temporary files left


async def test_stop_cancels_requests_in_flight_and_keeps_the_finished_ones():
    async with FakeOpenAIServer(FakeScript(first_delay=0.02, gap=0.02)) as server:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, stop.set)
        start = time.perf_counter()
        result = await run_load(requests_of(40, 10), EndpointConfig(server.base_url, "m"),
                                LoadConfig(concurrency=2, progress=False), stop=stop)
        elapsed = time.perf_counter() - start
        await asyncio.sleep(0.05)
        assert server.active == 0  # the cancelled streams were closed, not left running
    assert result.interrupted and elapsed < 0.8
    assert len(result.records) >= 2 and all(r.success for r in result.records)
    assert 1 <= result.num_cut_in_flight <= 2
    assert len(result.records) + result.num_cut_in_flight + result.num_not_started == 40


async def test_stop_during_warmup_or_arrival_gaps_returns_at_once():
    async with FakeOpenAIServer(FakeScript(first_delay=0.3, gap=0.01)) as server:
        endpoint = EndpointConfig(server.base_url, "m")
        for config in (LoadConfig(warmup=3, progress=False), LoadConfig(request_rate=0.5, seed=1, progress=False)):
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(0.1, stop.set)
            start = time.perf_counter()
            result = await run_load(requests_of(5, 2), endpoint, config, stop=stop)
            assert time.perf_counter() - start < 0.3
            assert result.interrupted and result.records == [] and result.num_cancelled == 5
