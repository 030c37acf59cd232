"""Async scheduling (step N+1 queued before step N's tokens reach the host) against the
synchronous engine: the same tokens, the same stops, no leaked blocks. The overlap only
pays on CUDA, but the bookkeeping is the same on CPU, where these tests run it."""

from __future__ import annotations

import pytest

from llmserve.core.sequence import PLACEHOLDER
from llmserve.sampling_params import SamplingParams
from tests.conftest import make_engine
from tests.test_model_parity import hf_greedy, random_prompts, run_staggered


def both(hf_model, **kw):
    return make_engine(hf_model, async_scheduling=False, **kw), make_engine(hf_model, async_scheduling=True, **kw)


def assert_drained(engine) -> None:
    assert not engine.has_unfinished_requests() and engine.core._in_flight is None
    assert engine.kv.num_used_blocks == 0, "blocks leaked"
    assert not engine.requests and not engine.core.requests
    engine.step()  # the last finished ids reach the runner with the next step
    assert len(engine.runner.requests) == 0, "the runner kept state of ended requests"


@pytest.mark.parametrize("kw", [dict(num_blocks=128), dict(num_blocks=128, max_num_batched_tokens=7),
                                dict(num_blocks=16, block_size=4)], ids=["plain", "chunked", "preempting"])
def test_async_greedy_tokens_equal_sync_and_hf(tiny_hf_llama, kw):
    prompts = random_prompts(10, 256, seed=3)
    sync, overlapped = both(tiny_hf_llama, **kw)
    assert overlapped.async_scheduling and not sync.async_scheduling
    expected = run_staggered(sync, prompts, 12)
    assert run_staggered(overlapped, prompts, 12) == expected
    assert expected["r0"] == hf_greedy(tiny_hf_llama, prompts[0], 12)
    assert_drained(overlapped)
    if kw.get("num_blocks") == 16:
        assert overlapped.scheduler.num_preemptions > 0


def test_stop_token_in_flight_ends_the_request_without_an_extra_token(tiny_hf_llama):
    prompts = random_prompts(6, 256, seed=4)
    free_run = run_staggered(make_engine(tiny_hf_llama, async_scheduling=False), prompts, 16)
    # stop each request at its 5th token: the async engine has already queued a 6th
    stops = {rid: tokens[4] for rid, tokens in free_run.items()}
    results = {}
    for async_scheduling in (False, True):
        engine = make_engine(tiny_hf_llama, async_scheduling=async_scheduling)
        outputs = {}
        for i, prompt in enumerate(prompts):
            params = SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[stops[f"r{i}"]])
            engine.add_request(f"r{i}", prompt, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens, _ = outputs.setdefault(out.request_id, ([], None))
                tokens.extend(out.new_token_ids)
                if out.finished:
                    outputs[out.request_id] = (tokens, (out.finish_reason, out.num_output_tokens))
        results[async_scheduling] = outputs
        assert_drained(engine)
    assert results[True] == results[False]
    for rid, (tokens, (reason, count)) in results[True].items():
        assert tokens[-1] == stops[rid] and reason == "stop" and count == len(tokens) <= 5


def test_max_tokens_and_min_tokens_are_exact(tiny_hf_llama):
    prompts = random_prompts(5, 256, seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=7, min_tokens=7, ignore_eos=False)
    sync, overlapped = both(tiny_hf_llama)
    expected = run_staggered(sync, prompts, 7, params)
    got = run_staggered(overlapped, prompts, 7, params)
    assert got == expected and all(len(t) == 7 for t in got.values())
    assert_drained(overlapped)


def test_abort_while_a_step_is_in_flight_frees_everything(tiny_hf_llama):
    prompts = random_prompts(4, 256, seed=7)
    sync, overlapped = both(tiny_hf_llama)
    expected = run_staggered(sync, prompts, 10)
    params = SamplingParams(temperature=0.0, max_tokens=10)
    for i, prompt in enumerate(prompts):
        overlapped.add_request(f"r{i}", prompt, params)
    tokens = {f"r{i}": [] for i in range(len(prompts))}
    for _ in range(3):
        for out in overlapped.step():
            tokens[out.request_id].extend(out.new_token_ids)
    assert overlapped.core._in_flight is not None
    overlapped.abort_request("r1")
    while overlapped.has_unfinished_requests():
        for out in overlapped.step():
            assert out.request_id != "r1", "an aborted request must not get more tokens"
            tokens[out.request_id].extend(out.new_token_ids)
    assert {k: v for k, v in tokens.items() if k != "r1"} == {k: v for k, v in expected.items() if k != "r1"}
    assert tokens["r1"] == expected["r1"][:len(tokens["r1"])]
    assert_drained(overlapped)


def test_penalties_and_logprobs_match_sync(tiny_hf_llama):
    # penalties read the previous ids, so the engine waits for them (no overlap) -- same tokens
    prompts = random_prompts(6, 256, seed=8)
    params = SamplingParams(temperature=0.0, max_tokens=10, repetition_penalty=1.3, frequency_penalty=0.5,
                            logprobs=3)
    runs = []
    for engine in both(tiny_hf_llama):
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        got = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(
                    (t.token_id, round(t.logprob, 4), tuple(i for i, _ in t.top_logprobs)) for t in out.new_logprobs)
        runs.append(got)
        assert_drained(engine)
    assert runs[0] == runs[1] and all(len(v) == 10 for v in runs[0].values())


def test_prefix_cache_keeps_working_and_no_placeholder_is_hashed(tiny_hf_llama):
    engine = make_engine(tiny_hf_llama, num_blocks=64, async_scheduling=True)
    prompt = random_prompts(1, 256, seed=9)[0] + [5] * 8
    first = run_staggered(engine, [prompt], 9)["r0"]
    second = run_staggered(engine, [prompt + first], 4)["r0"]  # the whole first exchange is a cached prefix
    assert engine.kv.prefix_hits > 0
    assert second == hf_greedy(tiny_hf_llama, prompt + first, 4)
    seen_hashes = set(engine.kv.hash_to_block)
    fresh = make_engine(tiny_hf_llama, num_blocks=64, async_scheduling=False)
    run_staggered(fresh, [prompt], 9)
    run_staggered(fresh, [prompt + first], 4)
    assert seen_hashes == set(fresh.kv.hash_to_block), "async must cache exactly the blocks sync caches"
    assert PLACEHOLDER not in first
