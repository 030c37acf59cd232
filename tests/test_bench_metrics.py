"""Metric math of the bench harness on hand-made request records, and dataset determinism."""

from __future__ import annotations

import pytest

from llmserve.bench.client import RequestRecord
from llmserve.bench.datasets import chat_dataset, random_dataset, workload_c_prompts
from llmserve.bench.metrics import (describe_slo, meets_slo, measured_duration, parse_slo, stats, summarize,
                                     throughput_over_time, tpot)


def make_record(request_id=0, start=0.0, chunk_times=(0.1, 0.3, 0.6), e2e=0.7, output_tokens=3, prompt_tokens=10,
                error_kind=None):
    chunk_times = list(chunk_times)
    return RequestRecord(request_id, start=start, ttft=chunk_times[0] if chunk_times else None, e2e=e2e,
                         chunk_times=chunk_times, output_tokens=output_tokens, prompt_tokens=prompt_tokens,
                         error_kind=error_kind)


def test_tpot_excludes_first_token():
    assert tpot(make_record(e2e=0.7, output_tokens=4)) == pytest.approx((0.7 - 0.1) / 3)
    assert tpot(make_record(output_tokens=1)) is None


def test_itl_is_gaps_between_chunks():
    assert make_record(chunk_times=(0.1, 0.3, 0.6)).itl == pytest.approx([0.2, 0.3])


def test_stats_percentiles_interpolate():
    s = stats([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s["count"], s["mean"], s["p50"]) == (5, 3.0, 3.0)
    assert s["p90"] == pytest.approx(4.6)
    assert s["p99"] == pytest.approx(4.96)
    assert stats([])["p50"] is None


def test_parse_slo_units():
    assert parse_slo("ttft=500ms,tpot=50ms") == pytest.approx({"ttft": 0.5, "tpot": 0.05})
    assert parse_slo("e2e=2s, ttft=250") == pytest.approx({"e2e": 2.0, "ttft": 0.25})
    assert parse_slo("") == {}
    with pytest.raises(ValueError):
        parse_slo("latency=5ms")
    with pytest.raises(ValueError):
        parse_slo("ttft=fast")


def test_duration_spans_first_start_to_last_end():
    records = [make_record(0, start=1.0, e2e=0.5), make_record(1, start=1.2, e2e=2.0), make_record(2, start=2.0,
                                                                                                  e2e=0.1)]
    assert measured_duration(records) == pytest.approx(2.2)


def test_summarize_throughput_and_errors():
    ok1 = make_record(0, start=0.0, chunk_times=(0.1, 0.3, 0.6), e2e=0.7, output_tokens=3, prompt_tokens=10)
    ok2 = make_record(1, start=1.0, chunk_times=(0.2, 0.4), e2e=1.0, output_tokens=5, prompt_tokens=20)
    failed = make_record(2, start=0.5, chunk_times=(), e2e=0.1, output_tokens=0, error_kind="http_500")
    dropped = make_record(3, start=0.5, chunk_times=(0.05, 0.06), e2e=0.2, output_tokens=2, error_kind="disconnect")
    agg = summarize([ok1, ok2, failed, dropped])
    assert agg["duration_s"] == pytest.approx(2.0)
    assert (agg["num_requests"], agg["num_successful"], agg["num_errors"]) == (4, 2, 2)
    assert agg["error_rate"] == 0.5
    assert agg["errors_by_kind"] == {"disconnect": 1, "http_500": 1}
    assert agg["request_throughput"] == pytest.approx(1.0)
    assert agg["output_throughput"] == pytest.approx(4.0)
    assert agg["total_token_throughput"] == pytest.approx(19.0)
    assert agg["ttft"]["mean"] == pytest.approx(0.15)
    assert agg["itl"]["count"] == 3 and agg["itl"]["mean"] == pytest.approx((0.2 + 0.3 + 0.2) / 3)
    assert agg["tpot"]["mean"] == pytest.approx(((0.7 - 0.1) / 2 + (1.0 - 0.2) / 4) / 2)
    assert agg["e2e"]["p50"] == pytest.approx(0.85)
    assert agg["goodput"] is None


def test_goodput_counts_only_successes_within_all_slos():
    fast = make_record(0, start=0.0, chunk_times=(0.1, 0.15), e2e=0.18, output_tokens=3)  # tpot 0.04
    slow_first = make_record(1, start=0.0, chunk_times=(0.6, 0.65), e2e=0.7, output_tokens=3)
    slow_decode = make_record(2, start=0.0, chunk_times=(0.1, 0.5), e2e=1.0, output_tokens=3)  # tpot 0.45
    one_token = make_record(3, start=0.0, chunk_times=(0.2,), e2e=0.2, output_tokens=1)
    failed = make_record(4, start=0.0, chunk_times=(0.1,), e2e=0.1, output_tokens=1, error_kind="timeout")
    slo = parse_slo("ttft=500ms,tpot=50ms")
    assert [meets_slo(r, slo) for r in (fast, slow_first, slow_decode, one_token, failed)] == [
        True, False, False, True, False]
    agg = summarize([fast, slow_first, slow_decode, one_token, failed], slo)
    assert agg["duration_s"] == pytest.approx(1.0)
    assert agg["goodput"] == pytest.approx(2.0)


def test_random_dataset_is_workload_t():
    a = random_dataset(64, (256, 1024), 256, seed=0)
    b = random_dataset(64, (256, 1024), 256, seed=0)
    assert [x.prompt for x in a] == [x.prompt for x in b]
    assert all(256 <= len(x.prompt) <= 1024 and x.prompt_len == len(x.prompt) and x.max_tokens == 256 for x in a)
    assert all(100 <= t < 30000 for x in a for t in x.prompt)
    assert [x.prompt for x in random_dataset(64, seed=1)] != [x.prompt for x in a]


def test_random_dataset_bounds_are_inclusive():
    lengths = {len(x.prompt) for x in random_dataset(400, (3, 5), 4, seed=0)}
    assert lengths == {3, 4, 5}


def test_workload_c_is_fixed_and_mixed_length():
    a, b = workload_c_prompts(), workload_c_prompts()
    assert len(a) == 64 and [x.prompt for x in a] == [x.prompt for x in b]
    words = [len(x.prompt.split()) for x in a]
    assert all(20 <= n <= 400 for n in words) and max(words) - min(words) > 200
    assert all(x.max_tokens == 128 and x.prompt.endswith("?") for x in a)


def test_chat_dataset_shares_system_prompt():
    items = chat_dataset(num_conversations=3, num_turns=2, system_words=100)
    assert len(items) == 6
    assert len({x.prompt[0]["content"] for x in items}) == 1
    assert [len(x.prompt) for x in items] == [2, 2, 2, 4, 4, 4]


def test_describe_slo_in_milliseconds():
    assert describe_slo(parse_slo("ttft=500ms,tpot=12.5ms,e2e=2s")) == "TTFT <= 500 ms, TPOT <= 12.5 ms, E2E <= 2000 ms"
    assert describe_slo({}) == "none"
    assert summarize([make_record()], parse_slo("ttft=1s"))["goodput_slo"] == "TTFT <= 1000 ms"


def test_throughput_over_time_spreads_tokens_over_chunks_per_second():
    # 4 tokens over 2 chunks at 0.5 s and 1.5 s; 3 tokens in 1 chunk at 3.2 s; a failed request counts for nothing.
    records = [make_record(0, start=0.25, chunk_times=(0.25, 1.25), output_tokens=4),
               make_record(1, start=3.0, chunk_times=(0.2,), output_tokens=3),
               make_record(2, start=0.0, chunk_times=(0.1, 0.2), output_tokens=50, error_kind="disconnect")]
    assert throughput_over_time(records, 1.0) == [(0.0, 2.0), (1.0, 2.0), (2.0, 0.0), (3.0, 3.0)]
    assert throughput_over_time(records, 2.0) == [(0.0, 2.0), (2.0, 1.5)]
    assert throughput_over_time([records[2]]) == []
