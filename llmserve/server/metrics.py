"""Prometheus metrics, in a registry owned by the app (no process-global registry).

Engine gauges and totals are read at scrape time; request histograms are observed as
requests end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llmserve.engine.async_engine import AsyncEngine

if TYPE_CHECKING:
    from llmserve.server.state import RequestStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                   0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    """The app's metrics; `observe(stats)` once per finished generation request."""

    def __init__(self, engine: AsyncEngine):
        self.registry = CollectorRegistry()
        self.requests_total = Counter(
            "llmserve_requests", "Engine requests (one per choice) by finish reason; 'error' for refused "
            "or failed HTTP requests", ["finish_reason"], registry=self.registry)
        self.ttft = Histogram("llmserve_time_to_first_token_seconds", "Arrival to first output token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("llmserve_inter_token_latency_seconds", "Gap between a choice's consecutive tokens",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("llmserve_e2e_request_latency_seconds", "Arrival to the end of the response",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(EngineCollector(engine))

    def observe(self, stats: "RequestStats", duration: float, failed: bool) -> None:
        for reason in stats.finish_reasons:
            self.requests_total.labels(reason).inc()
        if failed:
            self.requests_total.labels("error").inc()
        if stats.ttft is not None:
            self.ttft.observe(stats.ttft)
        for gap in stats.inter_token_latencies:
            self.itl.observe(gap)
        self.e2e.observe(duration)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector:
    """Reads the engine's queue, KV pool and token totals at scrape time."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def describe(self):
        return []  # unknown until the first scrape; keeps registration free of side effects

    def collect(self):
        core, kv = self.engine.engine, self.engine.engine.kv
        yield _gauge("llmserve_requests_running", "Requests being decoded or prefilled",
                     self.engine.num_running_requests)
        yield _gauge("llmserve_requests_waiting", "Requests queued for admission", self.engine.num_waiting_requests)
        yield _gauge("llmserve_kv_blocks_total", "KV cache blocks in the pool", kv.num_blocks)
        yield _gauge("llmserve_kv_blocks_used", "KV blocks held by requests (ref count > 0)", kv.num_used_blocks)
        yield _gauge("llmserve_kv_blocks_cached", "Free KV blocks still holding a reusable prefix",
                     kv.num_cached_blocks)
        yield _counter("llmserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                       kv.prefix_queries)
        yield _counter("llmserve_prefix_cache_hits", "Prompt tokens found in the prefix cache", kv.prefix_hits)
        yield _counter("llmserve_prompt_tokens", "Prompt tokens admitted", core.num_prompt_tokens_total)
        yield _counter("llmserve_generation_tokens", "Tokens generated", core.num_generation_tokens_total)
        yield _counter("llmserve_preemptions", "Sequences preempted for lack of KV blocks",
                       core.scheduler.num_preemptions)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
