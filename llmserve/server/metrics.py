"""Prometheus metrics, in a registry owned by the app (no process-global registry).

Engine gauges and totals are read at scrape time from each ready model's engine client (`stats()`:
the core's latest counters), summed over the models (one model: its values, no labels); request
histograms are observed as requests end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from llmserve.server.models import ModelRegistry
    from llmserve.server.state import RequestStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                   0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    """The app's metrics; `observe(stats)` once per finished generation request."""

    def __init__(self, models: ModelRegistry):
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
        self.registry.register(EngineCollector(models))

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
    """Reads the ready engines' stats (queues, KV pools, token totals) and every model's status, at scrape time."""

    def __init__(self, models: ModelRegistry):
        self.models = models

    def describe(self):
        return []  # unknown until the first scrape; keeps registration free of side effects

    def collect(self):
        models = self.models.ready()
        stats = [m.engine.stats() for m in models]

        def total(field: str) -> int:
            return sum(getattr(s, field) for s in stats)

        yield _gauge("llmserve_requests_running", "Requests being decoded or prefilled", total("num_running"))
        yield _gauge("llmserve_requests_waiting",
                     "Requests accepted but not running (not yet started, or preempted); --max-waiting bounds it",
                     sum(m.num_waiting for m in models))
        yield _gauge("llmserve_kv_blocks_total", "KV cache blocks in the pool", total("kv_blocks_total"))
        yield _gauge("llmserve_kv_blocks_used", "KV blocks held by requests (ref count > 0)", total("kv_blocks_used"))
        yield _gauge("llmserve_kv_blocks_cached", "Free KV blocks still holding a reusable prefix",
                     total("kv_blocks_cached"))
        yield _counter("llmserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                       total("prefix_cache_queries"))
        yield _counter("llmserve_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                       total("prefix_cache_hits"))
        yield _counter("llmserve_prompt_tokens", "Prompt tokens admitted", total("num_prompt_tokens_total"))
        yield _counter("llmserve_generation_tokens", "Tokens generated", total("num_generation_tokens_total"))
        yield _counter("llmserve_preemptions", "Sequences preempted for lack of KV blocks",
                       total("num_preemptions_total"))
        yield self._model_ready()

    def _model_ready(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily("llmserve_model_ready", "1 when the model serves, 0 while building or failed",
                                   labels=["model", "status"])
        for name, status in self.models.statuses().items():
            family.add_metric([name, status], 1.0 if status == "ready" else 0.0)
        return family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
