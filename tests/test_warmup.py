"""Warm-up at start-up leaves no trace: free blocks, an empty prefix cache, zero counters, same outputs."""

from __future__ import annotations

import pytest

from llmserve.engine.warmup import warm_up, warmup_requests
from llmserve.sampling_params import SamplingParams
from tests.conftest import make_engine, make_hf_llama


def greedy(engine, prompts: list[list[int]]) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{index}", prompt, params)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
    return tokens


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_warm_up_leaves_no_trace_and_changes_no_output(async_scheduling):
    hf = make_hf_llama(3)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42]]
    cold = make_engine(hf, num_blocks=64, block_size=4, async_scheduling=async_scheduling)
    warm = make_engine(hf, num_blocks=64, block_size=4, async_scheduling=async_scheduling)

    assert warm_up(warm.core) >= 0
    stats = warm.core.stats()
    assert (stats.kv_blocks_used, stats.kv_blocks_cached, stats.num_running, stats.num_waiting) == (0, 0, 0, 0)
    assert (stats.num_prompt_tokens_total, stats.num_generation_tokens_total, stats.num_steps) == (0, 0, 0)
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.num_preemptions_total) == (0, 0, 0)
    assert greedy(warm, prompts) == greedy(cold, prompts)


def test_warm_up_requests_cover_a_full_chunk_and_fit_the_pool():
    requests = warmup_requests(max_model_len=4096, max_batched_tokens=2048, max_num_seqs=256, vocab_size=1000,
                               pool_tokens=8192)
    assert len(requests[0].prompt_token_ids) == 2048  # one full prefill chunk
    short = requests[1:]
    assert len(short) == 64
    assert sum(len(r.prompt_token_ids) + r.params.max_tokens for r in short) <= 8192
    assert {r.params.temperature for r in short} >= {0.0, 0.8}
    assert any(r.params.logprobs for r in short)
    assert all(0 <= t < 1000 for r in requests for t in r.prompt_token_ids)
