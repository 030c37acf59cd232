"""Self-contained HTML report of one result: tables always, plots (base64 PNG) when matplotlib is installed."""

from __future__ import annotations

import html

from llmserve.bench import plots
from llmserve.bench.client import RequestRecord
from llmserve.bench.plots import LATENCY_KEYS
from llmserve.bench.summary import fmt, fmt_ms, goodput_line, requests_line, run_name, server_line

_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eee}"
          "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
          ".partial{background:#fee;border:1px solid #c00;padding:0.5em}")
COUNT_KEYS = ("planned", "submitted", "completed", "failed", "cancelled", "cancelled_in_flight", "not_started")


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


def paragraph(text: str, css_class: str | None = None) -> str:
    attr = f" class='{css_class}'" if css_class else ""
    return f"<p{attr}>{html.escape(text)}</p>"


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


def requests_table(runs: list[dict]) -> str:
    """One row per run: planned, submitted, completed, failed and cancelled requests."""
    rows = [[run["offered_rate"], *(run.get("requests", {}).get(key, "-") for key in COUNT_KEYS)] for run in runs]
    return table(["offered rate", *(key.replace("_", " ") for key in COUNT_KEYS)], rows)


def _errors_table(runs: list[dict]) -> str:
    rows = [[run["offered_rate"], fmt(run["aggregates"]["error_rate"], 3),
             ", ".join(f"{k}: {v}" for k, v in run["aggregates"]["errors_by_kind"].items()) or "none",
             fmt(run["client_overhead"]["cpu_fraction"], 3), fmt(run["client_overhead"]["mean_chunk_us"], 1)]
            for run in runs]
    return table(["offered rate", "error rate", "errors by kind", "client CPU / wall", "client us / chunk"], rows)


def _run_sentences(result: dict) -> str:
    config = result.get("config", {})
    parts = []
    for run in result["runs"]:
        lines = [requests_line(run, config), goodput_line(run["aggregates"])]
        lines.append(server_line(run.get("server_metrics")) or "server: no /metrics view (see the config's "
                     "metrics_interval_ms; a server other than llmserve has none)")
        parts.append(f"<h3>{html.escape(run_name(run))}</h3>" + "".join(paragraph(line) for line in lines))
    return "".join(parts)


def render_html(result: dict) -> str:
    """The whole report of one result file as one HTML string."""
    runs = result["runs"]
    env = result.get("environment", {})
    parts = [paragraph(f"{env.get('date', '')} on {env.get('host', '')}; latencies in ms.")]
    if result.get("interrupted"):
        parts.append(paragraph("Partial result: the run was interrupted (Ctrl-C); it holds the requests that "
                               "finished before, the others are counted as cancelled.", "partial"))
    parts += ["<h2>Requests</h2>", requests_table(runs), _run_sentences(result),
              "<h2>Aggregates</h2>", aggregates_table(runs),
              "<h2>Errors and client overhead</h2>", _errors_table(runs),
              "<h2>Configuration</h2>", table(["key", "value"], [[k, v] for k, v in result["config"].items()])]
    plt = plots.pyplot()
    if plt is None:
        parts.append("<p>matplotlib is not installed: no plots (pip install 'llmserve[bench]').</p>")
    else:
        at = parts.index("<h2>Errors and client overhead</h2>")
        parts[at:at] = _plots(plt, runs)
    return page(f"llmserve bench: {result.get('label') or 'run'}", "".join(parts))


def _plots(plt, runs: list[dict]) -> list[str]:
    series = {f"rate {run['offered_rate']}": records_of(run) for run in runs}
    parts = ["<h2>Latency CDFs</h2>", plots.png_tag(plt, plots.cdf_figure(plt, series)),
             "<h2>TTFT against prompt length</h2>", plots.png_tag(plt, plots.ttft_prompt_figure(plt, series))]
    if len(runs) > 1:
        parts += ["<h2>Throughput vs offered rate</h2>", plots.png_tag(plt, plots.sweep_figure(plt, runs))]
    for run, records in zip(runs, series.values()):
        parts += [f"<h2>Over time: {html.escape(run_name(run))}</h2>",
                  plots.png_tag(plt, plots.throughput_time_figure(plt, records, run.get("server_metrics"))),
                  plots.png_tag(plt, plots.itl_time_figure(plt, records))]
        if run.get("server_metrics"):
            parts.append(plots.png_tag(plt, plots.server_metrics_figure(plt, run["server_metrics"])))
    return parts
