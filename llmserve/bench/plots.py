"""Figures of the HTML reports (matplotlib, the optional `[bench]` extra), as inline PNG tags."""

from __future__ import annotations

import base64
import io

from llmserve.bench.client import RequestRecord
from llmserve.bench.metrics import throughput_over_time, tpot

LATENCY_KEYS = ("ttft", "tpot", "itl", "e2e")


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def png_tag(plt, fig) -> str:
    """The figure as an inline <img>; closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def latency_values(records: list[RequestRecord]) -> dict[str, list[float]]:
    """Per-metric latency samples in ms, successful requests only."""
    ok = [r for r in records if r.success]
    return {"ttft": [r.ttft * 1e3 for r in ok if r.ttft is not None],
            "tpot": [t * 1e3 for t in map(tpot, ok) if t is not None],
            "itl": [g * 1e3 for r in ok for g in r.itl],
            "e2e": [r.e2e * 1e3 for r in ok if r.e2e is not None]}


def cdf_figure(plt, series: dict[str, list[RequestRecord]]):
    """One panel per latency metric, one CDF line per labelled run."""
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for label, records in series.items():
        values = latency_values(records)
        for ax, key in zip(axes, LATENCY_KEYS):
            data = sorted(values[key])
            if data:
                ax.step(data, [(i + 1) / len(data) for i in range(len(data))], where="post", label=label)
    for ax, key in zip(axes, LATENCY_KEYS):
        ax.set_title(f"{key.upper()} CDF")
        ax.set_xlabel("ms")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def itl_time_figure(plt, records: list[RequestRecord]):
    """Each inter-token gap at the time it ended, over the run."""
    fig, ax = plt.subplots(figsize=(12, 3.5))
    xs, ys = [], []
    for r in records:
        if r.success:
            for t, gap in zip(r.chunk_times[1:], r.itl):
                xs.append(r.start + t)
                ys.append(gap * 1e3)
    ax.scatter(xs, ys, s=2, alpha=0.5)
    ax.set(title="ITL over time", xlabel="seconds since start", ylabel="ms")
    ax.grid(alpha=0.3)
    return fig


def throughput_time_figure(plt, records: list[RequestRecord], server_metrics: dict | None):
    """Output tokens/s per second of the run, as the client saw them and, when scraped, as the server counted."""
    fig, ax = plt.subplots(figsize=(12, 3.5))
    buckets = throughput_over_time(records, 1.0)
    if buckets:
        ax.stairs([rate for _, rate in buckets], [t for t, _ in buckets] + [buckets[-1][0] + 1.0],
                  label="client (per 1 s)")
    if server_metrics and len(server_metrics["t"]) > 1:
        t, total = server_metrics["t"], server_metrics["generation_tokens"]
        rates = [(b - a) / (t1 - t0) for a, b, t0, t1 in zip(total, total[1:], t, t[1:]) if t1 > t0]
        ax.plot(t[1:len(rates) + 1], rates, alpha=0.7, label="server /metrics")
    ax.set(title="output throughput over time", xlabel="seconds since start", ylabel="tokens/s")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def ttft_prompt_figure(plt, series: dict[str, list[RequestRecord]]):
    """TTFT of each successful request against its prompt length, one colour per labelled run."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, records in series.items():
        points = [(r.prompt_tokens, r.ttft * 1e3) for r in records
                  if r.success and r.prompt_tokens is not None and r.ttft is not None]
        ax.scatter([p for p, _ in points], [t for _, t in points], s=6, alpha=0.6, label=label)
    ax.set(title="TTFT against prompt length", xlabel="prompt tokens", ylabel="TTFT (ms)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def server_metrics_figure(plt, series: dict):
    """The scraped server state over the run: requests, KV blocks, preemptions since the start."""
    t = series["t"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 3.5))
    ax1.plot(t, series["requests_running"], label="running")
    ax1.plot(t, series["requests_waiting"], label="waiting")
    ax1.set(title="requests in the server", ylabel="requests")
    for key, label in (("kv_blocks_used", "in use"), ("kv_blocks_cached", "cached"), ("kv_blocks_free", "free")):
        ax2.plot(t, series[key], label=label)
    ax2.set(title=f"KV blocks (of {series['kv_blocks_total'][0]:.0f})" if t else "KV blocks", ylabel="blocks")
    first = series["preemptions"][0] if t else 0.0
    ax3.plot(t, [p - first for p in series["preemptions"]])
    ax3.set(title="preemptions since the start", ylabel="preemptions")
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("seconds since start")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    return fig


def sweep_figure(plt, runs: list[dict]):
    """Achieved request and output-token throughput against offered rate."""
    runs = [run for run in runs if isinstance(run["offered_rate"], (int, float))]
    rates = [run["offered_rate"] for run in runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.5))
    ax1.plot(rates, [run["aggregates"]["request_throughput"] for run in runs], "o-", label="achieved")
    ax1.plot(rates, rates, "--", color="gray", label="offered")
    ax1.set(title="request throughput", xlabel="offered rate (req/s)", ylabel="req/s")
    ax1.legend()
    ax2.plot(rates, [run["aggregates"]["output_throughput"] for run in runs], "o-")
    ax2.set(title="output tokens/s", xlabel="offered rate (req/s)", ylabel="tok/s")
    return fig
