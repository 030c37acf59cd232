"""What the bench report says: request fates, goodput with its SLO, the server-side view, the plots."""

from __future__ import annotations

import json
import sys
from html import escape as html_escape

import pytest

from llmserve.bench.client import EndpointConfig
from llmserve.bench.compare import compare_rows
from llmserve.bench.datasets import BenchRequest
from llmserve.bench.load import LoadConfig, run_load, run_sweep
from llmserve.bench.scrape import NoServerMetrics, ServerMonitor, parse_llmserve_metrics
from llmserve.cli import main as llmserve_main
from tests.fake_openai_server import FakeOpenAIServer, FakeScript, server_in_thread

LLMSERVE_PAGE = """# TYPE llmserve_requests_running gauge
llmserve_requests_running 3.0
llmserve_requests_waiting 2.0
llmserve_kv_blocks_total 100.0
llmserve_kv_blocks_used 30.0
llmserve_kv_blocks_cached 5.0
# TYPE llmserve_preemptions counter
llmserve_preemptions_total 4.0
# TYPE llmserve_generation_tokens counter
llmserve_generation_tokens_total 1234.0
"""


def requests_of(num: int, max_tokens: int) -> list[BenchRequest]:
    return [BenchRequest("Hello there", max_tokens, None) for _ in range(num)]


def bench_cli(server, tmp_path, *extra: str) -> tuple[int, dict, str]:
    """Run `llmserve bench serve` in-process against `server`; (exit status, JSON result, HTML text)."""
    out, html = tmp_path / "r.json", tmp_path / "r.html"
    code = llmserve_main(["bench", "serve", "--base-url", server.base_url, "--model", "m", "--dataset", "random",
                          "--input-len-min", "4", "--input-len-max", "9", "--endpoint", "completions",
                          "--no-progress", "--out", str(out), "--html", str(html), *extra])
    return code, json.loads(out.read_text()), html.read_text()


@pytest.fixture
def no_plots(monkeypatch):
    """HTML reports without matplotlib (tables and sentences only): much faster to render."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_goodput_is_printed_with_its_slo(tmp_path, capsys, no_plots):
    with server_in_thread(FakeScript(first_delay=0.01, gap=0.005)) as server:
        code, result, html = bench_cli(server, tmp_path, "--num-prompts", "4", "--output-len", "3",
                                       "--slo", "ttft=400ms,e2e=2s")
    stdout = capsys.readouterr().out
    slo_text = "SLO: TTFT <= 400 ms, E2E <= 2000 ms"
    assert code == 0
    assert [line.strip() for line in stdout.splitlines() if line.strip().startswith("goodput")] == [
        f"goodput {result['runs'][0]['aggregates']['goodput']:.2f} req/s ({slo_text})"]
    assert result["runs"][0]["aggregates"]["goodput_slo"] == "TTFT <= 400 ms, E2E <= 2000 ms"
    assert html_escape(slo_text) in html
    assert ["goodput SLO", "TTFT <= 400 ms, E2E <= 2000 ms"] in compare_rows([result])[1]


def test_max_seconds_reports_every_request_fate(tmp_path, capsys, no_plots):
    # 30 requests of ~0.2 s, two at a time, cut at 0.7 s: a few finish, two are cut, the rest never start.
    with server_in_thread(FakeScript(first_delay=0.02, gap=0.02)) as server:
        code, result, html = bench_cli(server, tmp_path, "--num-prompts", "30", "--output-len", "10",
                                       "--concurrency", "2", "--max-seconds", "0.7")
        num_seen_by_server = server.num_requests
    counts = result["runs"][0]["requests"]
    assert code == 0 and result["interrupted"] is False
    assert counts["planned"] == 30 == counts["completed"] + counts["failed"] + counts["cancelled"]
    assert counts["completed"] == len(result["runs"][0]["records"]) >= 2 and counts["failed"] == 0
    assert 1 <= counts["cancelled_in_flight"] <= 2 and counts["not_started"] >= 20
    assert counts["cancelled"] == counts["cancelled_in_flight"] + counts["not_started"]
    assert counts["submitted"] == counts["completed"] + counts["cancelled_in_flight"] >= num_seen_by_server
    line = next(x for x in capsys.readouterr().out.splitlines() if "planned" in x)
    assert (f"30 planned, {counts['submitted']} submitted: {counts['completed']} completed, 0 failed, "
            f"{counts['cancelled']} cancelled ({counts['cancelled_in_flight']} cut in flight, "
            f"{counts['not_started']} not started: --max-seconds 0.7)") in line
    assert "<th>not started</th>" in html and line.split(": ", 1)[1] in html
    assert compare_rows([result])[1][-1] == ["completed/planned", f"{counts['completed']}/30"]


async def test_server_metrics_are_sampled_through_the_run():
    warnings = []
    async with FakeOpenAIServer(FakeScript(first_delay=0.05, gap=0.02, metrics=True)) as server:
        monitor = ServerMonitor(EndpointConfig(server.base_url + "/v1", "m").metrics_url, 0.05, warnings.append)
        result = await run_load(requests_of(9, 10), EndpointConfig(server.base_url, "m"),
                                LoadConfig(concurrency=3, progress=False), monitor=monitor)
    series = result.server_metrics
    assert warnings == []
    assert len(series["t"]) >= 8 and series["t"] == sorted(series["t"]) and series["t"][0] < 0.05
    assert all(len(series[name]) == len(series["t"]) for name in ("requests_running", "kv_blocks_free"))
    assert max(series["requests_running"]) == 3
    assert all(free == 64 - 2 * running - 1 for free, running in zip(series["kv_blocks_free"],
                                                                    series["requests_running"]))
    assert series["generation_tokens"] == sorted(series["generation_tokens"]) and series["generation_tokens"][-1] > 0


async def test_missing_metrics_are_reported_once_for_a_sweep():
    warnings = []
    async with FakeOpenAIServer(FakeScript(first_delay=0.01, gap=0.005)) as server:
        monitor = ServerMonitor(server.base_url + "/metrics", 0.05, warnings.append)
        runs = await run_sweep(requests_of(3, 2), EndpointConfig(server.base_url, "m"), [50.0, 100.0],
                               LoadConfig(progress=False), monitor=monitor)
    assert [run.server_metrics for run in runs] == [None, None]
    assert len(warnings) == 1 and "HTTP 404" in warnings[0] and "/metrics" in warnings[0]


def test_parse_llmserve_metrics_derives_free_blocks():
    values = parse_llmserve_metrics(LLMSERVE_PAGE)
    assert values == {"requests_running": 3.0, "requests_waiting": 2.0, "kv_blocks_total": 100.0,
                      "kv_blocks_used": 30.0, "kv_blocks_cached": 5.0, "preemptions": 4.0,
                      "generation_tokens": 1234.0, "kv_blocks_free": 65.0}


@pytest.mark.parametrize("page, reason", [
    ("<html><body>Not found</body></html>", "not Prometheus text"),
    ("# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 1.0\n", "no llmserve metrics"),
    (LLMSERVE_PAGE.replace("llmserve_kv_blocks_cached 5.0\n", ""), "no llmserve_kv_blocks_cached"),
])
def test_parse_llmserve_metrics_says_what_is_missing(page, reason):
    with pytest.raises(NoServerMetrics, match=reason):
        parse_llmserve_metrics(page)


def test_html_plots_throughput_ttft_and_server_view(tmp_path):
    with server_in_thread(FakeScript(first_delay=0.02, gap=0.01, metrics=True)) as server:
        code, result, html = bench_cli(server, tmp_path, "--num-prompts", "6", "--output-len", "8",
                                       "--concurrency", "2", "--metrics-interval-ms", "40")
    assert code == 0 and result["runs"][0]["server_metrics"]["url"].endswith("/metrics")
    for heading in ("Latency CDFs", "TTFT against prompt length", "Over time: all at once, concurrency 2"):
        assert f"<h2>{heading}</h2>" in html
    # CDFs, TTFT vs prompt length, then per run: throughput over time, ITL over time, server metrics
    assert html.count("<img") == 5
    assert "server (/metrics, " in html and "KV blocks in use" in html
