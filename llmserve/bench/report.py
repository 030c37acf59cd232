"""Self-contained HTML report of one result: tables always, plots (base64 PNG) when matplotlib is installed."""

from __future__ import annotations

import base64
import html
import io

from llmserve.bench.client import RequestRecord

LATENCY_KEYS = ("ttft", "tpot", "itl", "e2e")
_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eee}"
          "td:first-child,th:first-child{text-align:left}img{max-width:100%}")


def records_of(run: dict) -> list[RequestRecord]:
    """The request records of one run dict of a result file."""
    return [RequestRecord(**rec) for rec in run["records"]]


def table(headers: list[str], rows: list[list]) -> str:
    """An HTML table; cells are escaped."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


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
    from llmserve.bench.metrics import tpot

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


def aggregates_table(runs: list[dict]) -> str:
    """One row per run: throughput, goodput, errors and latency percentiles in ms."""
    headers = ["offered rate", "concurrency", "requests", "errors", "req/s", "out tok/s", "total tok/s", "goodput"]
    headers += [f"{k} {s}" for k in LATENCY_KEYS for s in ("mean", "p50", "p90", "p99")]
    rows = []
    for run in runs:
        agg = run["aggregates"]
        row = [run["offered_rate"], run["concurrency"] or "-", agg["num_requests"], agg["num_errors"],
               fmt(agg["request_throughput"]), fmt(agg["output_throughput"], 1),
               fmt(agg["total_token_throughput"], 1), fmt(agg["goodput"])]
        row += [fmt_ms(agg[k][s]) for k in LATENCY_KEYS for s in ("mean", "p50", "p90", "p99")]
        rows.append(row)
    return table(headers, rows)


def render_html(result: dict) -> str:
    """The whole report of one result file as one HTML string."""
    runs = result["runs"]
    parts = [f"<p>{html.escape(result['environment'].get('date', ''))} on "
             f"{html.escape(result['environment'].get('host', ''))}; latencies in ms.</p>",
             "<h2>Aggregates</h2>", aggregates_table(runs),
             "<h2>Errors and client overhead</h2>", _errors_table(runs),
             "<h2>Configuration</h2>", table(["key", "value"], [[k, v] for k, v in result["config"].items()])]
    plt = pyplot()
    if plt is None:
        parts.append("<p>matplotlib is not installed: no plots (pip install 'llmserve[bench]').</p>")
    else:
        parts[3:3] = _plots(plt, runs)
    return page(f"llmserve bench: {result.get('label') or 'run'}", "".join(parts))


def _plots(plt, runs: list[dict]) -> list[str]:
    series = {f"rate {run['offered_rate']}": records_of(run) for run in runs}
    parts = ["<h2>Latency CDFs</h2>", png_tag(plt, cdf_figure(plt, series)),
             "<h2>ITL over time</h2>", png_tag(plt, itl_time_figure(plt, records_of(runs[-1])))]
    if len(runs) > 1:
        parts += ["<h2>Throughput vs offered rate</h2>", png_tag(plt, sweep_figure(plt, runs))]
    return parts


def _errors_table(runs: list[dict]) -> str:
    rows = [[run["offered_rate"], fmt(run["aggregates"]["error_rate"], 3),
             ", ".join(f"{k}: {v}" for k, v in run["aggregates"]["errors_by_kind"].items()) or "none",
             run.get("num_cancelled", 0), fmt(run["client_overhead"]["cpu_fraction"], 3),
             fmt(run["client_overhead"]["mean_chunk_us"], 1)] for run in runs]
    return table(["offered rate", "error rate", "errors by kind", "cut off by time bound", "client CPU / wall",
                  "client us / chunk"], rows)


def write_html(result: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(result))
