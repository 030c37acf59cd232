"""Aggregate metrics over request records: latency percentiles, throughput, goodput. Pure functions."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from llmserve.bench.client import RequestRecord

PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft", "tpot", "e2e")


def stats(values: list[float]) -> dict:
    """mean, p50, p90, p99 (linear interpolation) of `values`; all None when empty."""
    if not values:
        return {"count": 0, "mean": None, **{f"p{q}": None for q in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64)
    out = {"count": len(values), "mean": float(arr.mean())}
    out.update({f"p{q}": float(np.percentile(arr, q)) for q in PERCENTILES})
    return out


def tpot(record: RequestRecord) -> float | None:
    """Time per output token after the first: (e2e - ttft) / (out - 1); None when out <= 1."""
    if record.output_tokens <= 1 or record.ttft is None or record.e2e is None:
        return None
    return (record.e2e - record.ttft) / (record.output_tokens - 1)


def measured_duration(records: list[RequestRecord]) -> float:
    """First request start to last request end, over all records (failed ones included)."""
    ended = [r for r in records if r.e2e is not None]
    if not ended:
        return 0.0
    return max(r.start + r.e2e for r in ended) - min(r.start for r in ended)


def parse_slo(text: str | None) -> dict[str, float]:
    """`ttft=500ms,tpot=50ms` -> {"ttft": 0.5, "tpot": 0.05} in seconds; a bare number is ms."""
    slo: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, _, value = part.partition("=")
        key = key.strip().lower()
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*", value)
        if key not in SLO_KEYS or match is None:
            raise ValueError(f"bad SLO {part!r}: expected one of {SLO_KEYS} = <number>[ms|s]")
        slo[key] = float(match.group(1)) * (1.0 if match.group(2) == "s" else 1e-3)
    return slo


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    """Successful and within every SLO; a metric a request lacks (TPOT of one token) passes."""
    if not record.success:
        return False
    values = {"ttft": record.ttft, "tpot": tpot(record), "e2e": record.e2e}
    return all(values[key] is None or values[key] <= limit for key, limit in slo.items())


def summarize(records: list[RequestRecord], slo: dict[str, float] | None = None) -> dict:
    """All aggregates of one run; latencies over successful requests only."""
    ok = [r for r in records if r.success]
    duration = measured_duration(records)
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    errors = Counter(r.error_kind for r in records if not r.success)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    return {
        "num_requests": len(records), "num_successful": len(ok), "num_errors": len(records) - len(ok),
        "error_rate": (len(records) - len(ok)) / len(records) if records else 0.0,
        "errors_by_kind": dict(sorted(errors.items())),
        "duration_s": duration, "total_output_tokens": out_tokens, "total_input_tokens": in_tokens,
        "request_throughput": per_s(len(ok)), "output_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(out_tokens + in_tokens),
        "ttft": stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot": stats([t for t in map(tpot, ok) if t is not None]),
        "itl": stats([gap for r in ok for gap in r.itl]),
        "e2e": stats([r.e2e for r in ok if r.e2e is not None]),
        "slo": dict(slo or {}),
        "goodput": per_s(sum(meets_slo(r, slo) for r in ok)) if slo else None,
        "goodput_slo": describe_slo(slo) if slo else None,
    }


def describe_slo(slo: dict[str, float] | None) -> str:
    """`{"ttft": 0.5, "tpot": 0.05}` -> "TTFT <= 500 ms, TPOT <= 50 ms"; "none" when empty."""
    if not slo:
        return "none"
    return ", ".join(f"{key.upper()} <= {limit * 1e3:g} ms" for key, limit in slo.items())


def throughput_over_time(records: list[RequestRecord], bucket_s: float = 1.0) -> list[tuple[float, float]]:
    """(bucket start, output tokens/s) per `bucket_s` since the run's start, successful requests only.

    A request's tokens are spread evenly over its content chunks: usage may count several tokens
    for one chunk, and the chunk time is all we know of when they arrived.
    """
    assert bucket_s > 0, f"bucket_s must be > 0, got {bucket_s}"
    tokens: Counter[int] = Counter()
    for r in records:
        if r.success and r.chunk_times:
            per_chunk = r.output_tokens / len(r.chunk_times)
            for t in r.chunk_times:
                tokens[int((r.start + t) // bucket_s)] += per_chunk
    if not tokens:
        return []
    return [(b * bucket_s, tokens[b] / bucket_s) for b in range(max(tokens) + 1)]
