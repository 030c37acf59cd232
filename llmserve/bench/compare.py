"""Side-by-side comparison of result files: one table with ratios against the first, one HTML report."""

from __future__ import annotations

from llmserve.bench import plots, report
from llmserve.bench.metrics import describe_slo
from llmserve.bench.results import load_result, write_text_atomic

# (column name, getter on a run's aggregates, scale for display)
KEY_METRICS = [
    ("req/s", lambda a: a["request_throughput"], 1.0),
    ("out tok/s", lambda a: a["output_throughput"], 1.0),
    ("total tok/s", lambda a: a["total_token_throughput"], 1.0),
    ("goodput req/s", lambda a: a["goodput"], 1.0),
    ("TTFT p50 ms", lambda a: a["ttft"]["p50"], 1e3),
    ("TTFT p99 ms", lambda a: a["ttft"]["p99"], 1e3),
    ("TPOT p50 ms", lambda a: a["tpot"]["p50"], 1e3),
    ("ITL p50 ms", lambda a: a["itl"]["p50"], 1e3),
    ("ITL p99 ms", lambda a: a["itl"]["p99"], 1e3),
    ("E2E p50 ms", lambda a: a["e2e"]["p50"], 1e3),
    ("error rate", lambda a: a["error_rate"], 1.0),
]


def load_results(paths: list[str]) -> list[dict]:
    """Every file as a result; BenchError naming the first that is not one."""
    return [load_result(path) for path in paths]


def columns(results: list[dict]) -> list[tuple[str, dict]]:
    """(name, run) for every run of every result, in file order."""
    cols = []
    for i, result in enumerate(results):
        label = (result.get("label") or f"run{i}") + (" (partial)" if result.get("interrupted") else "")
        for run in result["runs"]:
            suffix = "" if len(result["runs"]) == 1 else f"@{run['offered_rate']}"
            cols.append((label + suffix, run))
    return cols


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base, or None when either is missing or base is zero."""
    if value is None or base is None or base == 0:
        return None
    return value / base


def compare_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: one row per key metric, `value (xratio)` per run against the first; the goodput SLO
    and completed/planned requests beside them."""
    cols = columns(results)
    headers = ["metric"] + [name for name, _ in cols]
    rows = []
    for name, getter, scale in KEY_METRICS:
        values = [getter(run["aggregates"]) for _, run in cols]
        row = [name]
        for value in values:
            r = ratio(value, values[0])
            shown = "-" if value is None else f"{value * scale:.2f}"
            row.append(shown if r is None else f"{shown} (x{r:.2f})")
        rows.append(row)
    rows.insert(4, ["goodput SLO"] + [describe_slo(run["aggregates"].get("slo")) for _, run in cols])
    rows.append(["completed/planned"] + [completed_of_planned(run) for _, run in cols])
    return headers, rows


def completed_of_planned(run: dict) -> str:
    """`61/64`: successful requests of all planned ones (cancelled ones count as not completed)."""
    counts = run.get("requests") or {"planned": run["aggregates"]["num_requests"] + run.get("num_cancelled", 0)}
    return f"{run['aggregates']['num_successful']}/{counts['planned']}"


def render_html(results: list[dict]) -> str:
    """All results in one page: the ratio table, overlaid CDFs, and each run's aggregates."""
    headers, rows = compare_rows(results)
    parts = ["<h2>Key metrics (ratio against the first)</h2>", report.table(headers, rows)]
    plt = plots.pyplot()
    if plt is not None:
        series = {name: report.records_of(run) for name, run in columns(results)}
        parts += ["<h2>Latency CDFs</h2>", plots.png_tag(plt, plots.cdf_figure(plt, series))]
    for name, run in columns(results):
        parts += [f"<h3>{report.html.escape(name)}</h3>", report.aggregates_table([run])]
    return report.page("llmserve bench compare", "".join(parts))


def write_html(results: list[dict], path: str) -> None:
    write_text_atomic(path, render_html(results))
