"""Plain-text descriptions of a result: the terminal table and the per-run sentences the HTML repeats."""

from __future__ import annotations


def format_text(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned text table."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_name(run: dict) -> str:
    """`rate 4.0 req/s` or `rate inf, concurrency 16`."""
    rate = run["offered_rate"]
    name = "all at once" if rate == "inf" else f"rate {rate} req/s"
    return name + (f", concurrency {run['concurrency']}" if run.get("concurrency") else "")


def requests_line(run: dict, config: dict) -> str:
    """What became of the planned requests, with why some were cancelled."""
    n = run.get("requests")
    if n is None:  # a result file written before the counts existed
        return f"{run['aggregates']['num_requests']} requests, {run.get('num_cancelled', 0)} cancelled"
    line = (f"{n['planned']} planned, {n['submitted']} submitted: {n['completed']} completed, {n['failed']} failed, "
            f"{n['cancelled']} cancelled")
    if n["cancelled"]:
        why = "interrupted" if run.get("interrupted") else f"--max-seconds {config.get('max_seconds')}"
        line += f" ({n['cancelled_in_flight']} cut in flight, {n['not_started']} not started: {why})"
    return line


def goodput_line(aggregates: dict) -> str:
    """`goodput 3.10 req/s (SLO: TTFT <= 500 ms, TPOT <= 50 ms)`, or why there is none."""
    if aggregates.get("goodput") is None:
        return "goodput: no SLO given (--slo)"
    return f"goodput {aggregates['goodput']:.2f} req/s (SLO: {aggregates.get('goodput_slo') or 'see config'})"


def server_line(series: dict | None) -> str | None:
    """Peaks of the scraped server state over the run, or None when nothing was scraped."""
    if not series or not series["t"]:
        return None
    preempted = series["preemptions"][-1] - series["preemptions"][0]
    return (f"server (/metrics, {len(series['t'])} samples): peak {max(series['requests_running']):.0f} running, "
            f"{max(series['requests_waiting']):.0f} waiting; peak {max(series['kv_blocks_used']):.0f} of "
            f"{series['kv_blocks_total'][-1]:.0f} KV blocks in use; {preempted:.0f} preemptions")


def run_lines(run: dict, config: dict) -> list[str]:
    """The sentences under the table for one run."""
    lines = [f"{run_name(run)}: {requests_line(run, config)}", "  " + goodput_line(run["aggregates"])]
    server = server_line(run.get("server_metrics"))
    return lines + (["  " + server] if server else [])


def summary_text(result: dict) -> str:
    """A short table (one row per run, latencies in ms), then per-run counts, goodput with its SLO, server view."""
    headers = ["rate", "conc", "completed", "failed", "cancelled", "req/s", "out tok/s", "goodput", "TTFT p50",
               "TTFT p99", "TPOT p50", "ITL p50", "ITL p99", "errors", "client cpu"]
    rows = []
    for run in result["runs"]:
        a, n = run["aggregates"], run.get("requests") or {}
        rows.append([str(run["offered_rate"]), str(run["concurrency"] or "-"), str(a["num_successful"]),
                     str(a["num_errors"]), str(n.get("cancelled", run.get("num_cancelled", 0))),
                     fmt(a["request_throughput"]), fmt(a["output_throughput"], 1), fmt(a["goodput"]),
                     fmt_ms(a["ttft"]["p50"]), fmt_ms(a["ttft"]["p99"]), fmt_ms(a["tpot"]["p50"]),
                     fmt_ms(a["itl"]["p50"]), fmt_ms(a["itl"]["p99"]),
                     ",".join(f"{k}:{v}" for k, v in a["errors_by_kind"].items()) or "0",
                     f"{run['client_overhead']['cpu_fraction']:.0%}"])
    lines = [format_text(headers, rows)]
    if result.get("interrupted"):
        lines.insert(0, "INTERRUPTED: partial result, what finished before Ctrl-C")
    for run in result["runs"]:
        lines += run_lines(run, result.get("config", {}))
    return "\n".join(lines)
