"""The real load generator against a scripted fake OpenAI server: latencies, token counts, errors, CLI files."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys

import numpy as np
import pytest

from llmserve.bench import report
from llmserve.bench.client import EndpointConfig
from llmserve.bench.datasets import BenchRequest, random_dataset
from llmserve.bench.load import LoadConfig, arrival_gaps, run_load
from llmserve.bench.errors import BenchError
from llmserve.bench.metrics import summarize
from llmserve.bench.preflight import check_model
from llmserve.bench.scrape import ServerMonitor
from llmserve.cli import main as llmserve_main
from tests.fake_openai_server import FakeOpenAIServer, FakeScript, server_in_thread

# Generous bounds for a loaded machine: a sleep is never early, but it can be late.
EARLY, LATE = 0.005, 0.060


def requests_of(num: int, max_tokens: int, prompt="Hello there") -> list[BenchRequest]:
    return [BenchRequest(prompt, max_tokens, None) for _ in range(num)]


def load(**overrides) -> LoadConfig:
    return LoadConfig(**{"progress": False, **overrides})


async def test_latencies_match_scripted_delays():
    async with FakeOpenAIServer(FakeScript(first_delay=0.1, gap=0.04)) as server:
        result = await run_load(requests_of(6, 5), EndpointConfig(server.base_url, "m"), load(concurrency=3))
    assert all(r.success for r in result.records)
    ttfts = [r.ttft for r in result.records]
    gaps = [g for r in result.records for g in r.itl]
    assert min(ttfts) >= 0.1 - EARLY and statistics.median(ttfts) <= 0.1 + LATE
    assert len(gaps) == 6 * 4
    assert 0.04 - EARLY <= statistics.median(gaps) <= 0.04 + LATE
    agg = summarize(result.records)
    assert 0.04 - EARLY <= agg["tpot"]["p50"] <= 0.04 + LATE
    assert 0.26 - EARLY <= agg["e2e"]["p50"] <= 0.26 + 2 * LATE
    assert 0.0 <= result.client_cpu_fraction and result.mean_chunk_seconds > 0


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_output_tokens_come_from_usage(endpoint):
    script = FakeScript(first_delay=0.01, gap=0.005, tokens_per_chunk=3)
    prompt = "Hi" if endpoint == "chat" else [101, 102, 103]
    async with FakeOpenAIServer(script) as server:
        result = await run_load(requests_of(3, 4, prompt), EndpointConfig(server.base_url + "/v1", "m", endpoint),
                                load())
        body = server.bodies[0]
    assert [(r.output_tokens, r.output_tokens_source, r.prompt_tokens) for r in result.records] == [(12, "usage", 7)] * 3
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.0 and ("messages" in body) == (endpoint == "chat")


async def test_output_tokens_fall_back_to_chunks_without_usage():
    script = FakeScript(first_delay=0.01, gap=0.005, tokens_per_chunk=3, send_usage=False)
    async with FakeOpenAIServer(script) as server:
        result = await run_load(requests_of(2, 4), EndpointConfig(server.base_url, "m", ignore_eos=True), load())
        assert server.bodies[0]["ignore_eos"] is True
    assert [(r.output_tokens, r.output_tokens_source) for r in result.records] == [(4, "chunks")] * 2


async def test_errors_and_disconnects_are_counted_and_excluded():
    script = FakeScript(first_delay=0.02, gap=0.01, statuses={1: 500, 2: 429}, drop_after={3: 2})
    async with FakeOpenAIServer(script) as server:
        result = await run_load(requests_of(6, 5), EndpointConfig(server.base_url, "m"), load(concurrency=1))
    kinds = [r.error_kind for r in result.records]
    assert kinds == [None, "http_500", "http_429", "disconnect", None, None]
    agg = summarize(result.records)
    assert agg["errors_by_kind"] == {"disconnect": 1, "http_429": 1, "http_500": 1}
    assert agg["error_rate"] == 0.5
    assert agg["ttft"]["count"] == 3 and agg["itl"]["count"] == 3 * 4 and agg["e2e"]["count"] == 3
    assert agg["total_output_tokens"] == 15
    assert "scripted 500" in result.records[1].error_message


async def test_concurrency_limit_is_respected():
    async with FakeOpenAIServer(FakeScript(first_delay=0.02, gap=0.01)) as server:
        result = await run_load(requests_of(12, 3), EndpointConfig(server.base_url, "m"), load(concurrency=3))
        assert server.max_concurrent == 3
    assert len(result.records) == 12 and all(r.success for r in result.records)


async def test_poisson_sends_requested_number_after_warmup():
    async with FakeOpenAIServer(FakeScript(first_delay=0.005, gap=0.002)) as server:
        result = await run_load(requests_of(15, 2), EndpointConfig(server.base_url, "m"),
                                load(request_rate=100.0, warmup=2, seed=3))
        assert server.num_requests == 17
    assert [r.request_id for r in result.records] == list(range(15))


async def test_max_seconds_bounds_the_run():
    async with FakeOpenAIServer(FakeScript(first_delay=0.01, gap=0.005)) as server:
        result = await run_load(requests_of(100, 2), EndpointConfig(server.base_url, "m"),
                                load(request_rate=5.0, max_seconds=0.5))
        assert server.num_requests < 100
    assert len(result.records) + result.num_cut_in_flight == server.num_requests
    assert len(result.records) + result.num_cancelled == 100 and result.num_not_started > 0


def test_arrival_gaps_are_seeded_with_the_requested_mean():
    assert arrival_gaps(5, 10.0, 1.0, seed=7) == arrival_gaps(5, 10.0, 1.0, seed=7)
    assert arrival_gaps(3, float("inf"), 1.0, seed=0) == [0.0, 0.0, 0.0]
    poisson, bursty = np.array(arrival_gaps(20000, 4.0, 1.0, 0)), np.array(arrival_gaps(20000, 4.0, 0.25, 0))
    assert poisson.mean() == pytest.approx(0.25, rel=0.05) and bursty.mean() == pytest.approx(0.25, rel=0.1)
    assert bursty.std() > 1.5 * poisson.std()


def test_random_dataset_as_text_for_chat():
    items = random_dataset(4, (5, 8), 16, seed=0, endpoint="chat")
    assert all(isinstance(x.prompt, str) and len(x.prompt.split()) == x.prompt_len for x in items)


def run_cli(server, tmp_path, label: str, *extra: str) -> dict:
    out, html = tmp_path / f"{label}.json", tmp_path / f"{label}.html"
    code = llmserve_main(["bench", "serve", "--base-url", server.base_url, "--model", "m", "--dataset", "random",
                          "--num-prompts", "8", "--input-len-min", "4", "--input-len-max", "8", "--output-len", "4",
                          "--endpoint", "completions", "--no-progress", "--label", label, "--out", str(out),
                          "--html", str(html), *extra])
    assert code == 0
    assert "<table" in html.read_text() and "<img" in html.read_text()
    return json.loads(out.read_text())


def test_cli_writes_results_and_compare_gives_ratios(tmp_path, capsys):
    with server_in_thread(FakeScript(first_delay=0.01, gap=0.005, statuses={2: 500})) as server:
        a = run_cli(server, tmp_path, "a", "--concurrency", "2", "--warmup", "1")
        b = run_cli(server, tmp_path, "b", "--sweep-rates", "50,100")
    assert a["environment"]["python"] and a["config"]["concurrency"] == 2 and len(a["runs"]) == 1
    assert len(a["runs"][0]["records"]) == 8 and a["runs"][0]["aggregates"]["errors_by_kind"] == {"http_500": 1}
    assert [run["offered_rate"] for run in b["runs"]] == [50.0, 100.0]
    capsys.readouterr()
    assert llmserve_main(["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                          "--html", str(tmp_path / "cmp.html")]) == 0
    text = capsys.readouterr().out
    base, other = a["runs"][0]["aggregates"]["output_throughput"], b["runs"][1]["aggregates"]["output_throughput"]
    row = next(line for line in text.splitlines() if line.startswith("out tok/s"))
    assert "(x1.00)" in row and f"(x{other / base:.2f})" in row
    assert "b@100.0" in text and "<img" in (tmp_path / "cmp.html").read_text()


def test_html_report_without_matplotlib_still_has_tables(tmp_path, monkeypatch):
    records = [{"request_id": 0, "start": 0.0, "ttft": 0.1, "e2e": 0.3, "chunk_times": [0.1, 0.2, 0.3],
                "output_tokens": 3, "output_tokens_source": "usage", "prompt_tokens": 5, "error_kind": None,
                "error_message": None}]
    from llmserve.bench.client import RequestRecord
    run = {"offered_rate": "inf", "concurrency": 1, "num_cancelled": 0,
           "client_overhead": {"cpu_fraction": 0.1, "mean_chunk_us": 5.0},
           "aggregates": summarize([RequestRecord(**records[0])]), "records": records}
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    html = report.render_html({"label": "x", "config": {"model": "m"}, "environment": {}, "runs": [run]})
    assert "<table" in html and "<img" not in html and "matplotlib is not installed" in html


def test_bench_against_the_real_llmserve_server():
    from tests.server_helpers import make_tiny_engine, smollm2_tokenizer_or_none, start_server

    tokenizer = smollm2_tokenizer_or_none()
    if tokenizer is None:
        pytest.skip("default model checkpoint not pulled")
    server = start_server(make_tiny_engine(tokenizer), served_model_name="tiny")
    try:
        # "default" is an alias the model list leaves out; GET /v1/models/default finds it
        asyncio.run(check_model(EndpointConfig(server.v1, "default"), warn=pytest.fail))
        for num_runs, endpoint in enumerate(("chat", "completions"), 1):
            items = random_dataset(4, (10, 30), 6, seed=0, tokenizer=tokenizer, endpoint=endpoint)
            config = EndpointConfig(server.v1, "default", endpoint, ignore_eos=True)
            monitor = ServerMonitor(config.metrics_url, 0.02, warn=pytest.fail)
            result = asyncio.run(run_load(items, config, load(concurrency=2), tokenizer, monitor=monitor))
            assert [(r.error_kind, r.output_tokens, r.output_tokens_source) for r in result.records] == [
                (None, 6, "usage")] * 4
            assert_real_server_metrics(result.server_metrics, num_generated=num_runs * 4 * 6)
        with pytest.raises(BenchError, match="does not serve model 'llama'; it serves 'tiny'"):
            asyncio.run(check_model(EndpointConfig(server.v1, "llama"), warn=pytest.fail))
    finally:
        server.stop()


def assert_real_server_metrics(series: dict, num_generated: int) -> None:
    """llmserve's own /metrics, scraped through a run: every block accounted for, none in use at the end."""
    assert series is not None and len(series["t"]) >= 2 and series["t"] == sorted(series["t"])
    assert set(series["kv_blocks_total"]) == {256.0}
    for used, cached, free in zip(series["kv_blocks_used"], series["kv_blocks_cached"], series["kv_blocks_free"]):
        assert used + cached + free == 256 and min(used, cached, free) >= 0
    assert series["kv_blocks_used"][-1] == 0 and series["requests_running"][-1] == 0
    assert series["generation_tokens"][-1] == num_generated and series["preemptions"][-1] == 0


async def test_malformed_stream_and_timeout_are_their_own_error_kinds():
    script = FakeScript(first_delay=0.02, gap=0.01, malformed={1}, stall={2: 1.0})
    async with FakeOpenAIServer(script) as server:
        endpoint = EndpointConfig(server.base_url, "m", request_timeout=0.4)
        result = await run_load(requests_of(4, 3), endpoint, load(concurrency=1))
    assert [r.error_kind for r in result.records] == [None, "malformed", "timeout", None]
    timed_out = result.records[2]
    assert timed_out.ttft is None and 0.4 - EARLY <= timed_out.e2e < 0.9  # cut at the timeout, not the stall
    agg = summarize(result.records)
    assert agg["errors_by_kind"] == {"malformed": 1, "timeout": 1} and agg["ttft"]["count"] == 2
