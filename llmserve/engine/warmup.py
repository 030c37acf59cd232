"""Warm-up at start-up: throwaway requests through every path a real batch takes, before the core says READY.

On CUDA, Triton compiles each kernel variant the first time a shape needs it (prefill tiles, decode split
counts, the sampler's noise kernel) and that took seconds inside the first users' requests: a fresh server
measured 20-45 % slower than a warm one. Running the shapes now moves that cost before /health says ready.
Afterwards nothing of the warm-up remains visible: its blocks are free, the prefix cache holds none of its
prompts, and the token counters read zero.
"""

from __future__ import annotations

import logging
import time

from llmserve.core.messages import EngineCoreRequest
from llmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
MAX_DECODE_BATCH = 64  # decode batches above the largest CUDA graph run eagerly; this covers their split counts
MAX_STEPS = 10_000  # a bound, should a bug keep the warm-up requests alive


def warm_up(core) -> float:
    """Run the warm-up requests on `core` (an idle EngineCore) to completion and reset what they left;
    the seconds it took."""
    assert not core.has_unfinished_requests(), "warm up an idle engine core only"
    began = time.perf_counter()
    scheduler = core.config.scheduler
    pool_tokens = core.kv.num_blocks * core.kv.block_size
    for request in warmup_requests(core.max_model_len, scheduler.max_num_batched_tokens, scheduler.max_num_seqs,
                                   core.model_config.vocab_size, pool_tokens):
        core.add_request(request)
    for _ in range(MAX_STEPS):
        if not core.has_unfinished_requests():
            break
        core.step()
    else:
        raise RuntimeError(f"the warm-up requests did not finish within {MAX_STEPS} steps")
    _forget(core)
    _compile_decode_splits(core)
    seconds = time.perf_counter() - began
    logger.info("warm-up: kernels compiled and paths exercised in %.1f s", seconds)
    return seconds


def warmup_requests(max_model_len: int, max_batched_tokens: int, max_num_seqs: int, vocab_size: int,
                    pool_tokens: int) -> list[EngineCoreRequest]:
    """One prompt as long as a full prefill chunk, then a batch of short prompts of mixed lengths and sampling
    kinds (greedy, top-k/top-p with a seed, logprobs) decoding together for a few steps; the batch fits the
    KV pool at once (a small pool makes the prompts shorter, not the batch preempt)."""
    def prompt(length: int, offset: int) -> list[int]:
        return [(offset + 7 * i) % vocab_size for i in range(length)]

    long_len = max(1, min(max_batched_tokens, max_model_len - 4))
    requests = [EngineCoreRequest("warmup-long", prompt(long_len, 1), _params(0, 4))]
    batch = max(1, min(max_num_seqs, MAX_DECODE_BATCH))
    room = max(1, min(pool_tokens // batch - 8 - 1, max_model_len - 9))  # prompt tokens each, beside 8 outputs
    for index in range(batch):
        length = 1 + (index * 37) % min(200, room)
        requests.append(EngineCoreRequest(f"warmup-{index}", prompt(length, 11 + index), _params(index, 8)))
    return requests


def _params(index: int, max_tokens: int) -> SamplingParams:
    kind = index % 3
    if kind == 0:
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    if kind == 1:
        return SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=index, max_tokens=max_tokens,
                              ignore_eos=True)
    return SamplingParams(temperature=1.0, logprobs=5, max_tokens=max_tokens, ignore_eos=True)


def _compile_decode_splits(core) -> None:
    """On CUDA with Triton: every split count of the decode kernel (the requests above may not meet them all)."""
    runner = core.runner
    if runner.device.type != "cuda":
        return
    from llmserve.ops.triton_attention import compile_decode_variants

    k_cache, v_cache = runner.kv_caches[0][0], runner.kv_caches[0][1]
    compile_decode_variants(k_cache, v_cache, runner.config.num_attention_heads, runner.dtype)


def _forget(core) -> None:
    """The warm-up's traces: cached prompt blocks, counters of tokens, steps and prefix lookups."""
    core.kv.reset_prefix_cache()
    core.kv.prefix_queries = core.kv.prefix_hits = 0
    core.num_prompt_tokens_total = core.num_generation_tokens_total = core.num_steps = 0
    core.scheduler.num_preemptions = 0
