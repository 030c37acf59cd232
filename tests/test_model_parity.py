"""The native model and engine against HuggingFace transformers, float32 on CPU."""

from __future__ import annotations

import pytest
import torch

from llmserve.core.sequence import Sequence
from llmserve.sampling_params import SamplingParams
from tests.conftest import make_engine, make_hf_llama, prefill_hidden


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0]  # [T, V]


def random_prompts(count: int, vocab: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 40, (count,), generator=gen).tolist()
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def run_staggered(engine, prompts: list[list[int]], max_tokens: int, params=None) -> dict[str, list[int]]:
    """Add request i at step i (in-flight arrivals) and run everything to the end."""
    params = params or SamplingParams(temperature=0.0, max_tokens=max_tokens)
    tokens: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished_requests():
        if pending:
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, params)
            tokens[f"r{i}"] = []
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    return tokens


CONFIGS = {
    "gqa": dict(),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=32)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mixed_prefill_decode_step_logits_match_hf(name):
    hf_model = make_hf_llama(**CONFIGS[name])
    engine = make_engine(hf_model, num_blocks=32, block_size=4)
    scheduler, runner = engine.scheduler, engine.runner
    a = Sequence("a", random_prompts(1, 256, seed=2)[0][:9], SamplingParams(), max_output_tokens=4)
    b = Sequence("b", random_prompts(1, 256, seed=3)[0][:13], SamplingParams(), max_output_tokens=4)
    # step 1: a's whole prompt; step 2: a decodes its first output while b prefills
    scheduler.add(a)
    first = scheduler.schedule()
    scheduler.update(first, runner.execute(first))
    scheduler.add(b)
    step = scheduler.schedule()
    assert step.num_scheduled_tokens == {"a": 1, "b": 13}
    batch = runner.prepare_inputs(step)
    with torch.no_grad():
        hidden = runner.model(batch.input_ids, batch.positions, runner.kv_caches, batch.meta)
        logits = runner.model.compute_logits(hidden)  # [T, V]: every position of the batch
    # batch order is decodes first: a's token, then b's 13 tokens
    ref_a = hf_logits(hf_model, a.token_ids())[-1]
    ref_b = hf_logits(hf_model, b.token_ids())
    torch.testing.assert_close(logits[0], ref_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1:], ref_b, rtol=1e-4, atol=1e-4)


def check_greedy_parity(hf_model, engine, num_requests: int = 10, max_tokens: int = 12):
    prompts = random_prompts(num_requests, hf_model.config.vocab_size)
    got = run_staggered(engine, prompts, max_tokens)
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}"] == hf_greedy(hf_model, prompt, max_tokens), f"request {i} diverged"
    assert engine.kv.num_used_blocks == 0


def test_greedy_matches_hf_with_in_flight_arrivals(tiny_hf_llama):
    check_greedy_parity(tiny_hf_llama, make_engine(tiny_hf_llama, num_blocks=128))


def test_greedy_matches_hf_with_chunked_prefill(tiny_hf_llama):
    engine = make_engine(tiny_hf_llama, num_blocks=128, max_num_batched_tokens=7)
    check_greedy_parity(tiny_hf_llama, engine)


def test_greedy_matches_hf_under_preemption(tiny_hf_llama):
    engine = make_engine(tiny_hf_llama, num_blocks=16, block_size=4)  # 64 slots for 10 requests
    check_greedy_parity(tiny_hf_llama, engine)
    assert engine.scheduler.num_preemptions > 0, "the pool was meant to be too small"


def test_greedy_matches_hf_with_tied_mha_model():
    hf_model = make_hf_llama(seed=5, **CONFIGS["mha-tied"])
    check_greedy_parity(hf_model, make_engine(hf_model, num_blocks=128), num_requests=8)


def test_prefix_cache_hit_gives_same_tokens(tiny_hf_llama):
    engine = make_engine(tiny_hf_llama, num_blocks=64)
    prompt = random_prompts(1, 256, seed=9)[0] + [5] * 8
    first = run_staggered(engine, [prompt], 8)["r0"]
    second = run_staggered(engine, [prompt], 8)["r0"]
    assert second == first == hf_greedy(tiny_hf_llama, prompt, 8)
    assert engine.kv.prefix_hits > 0


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(tiny_hf_llama):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    prompt = random_prompts(1, 256, seed=11)[0]
    alone = make_engine(tiny_hf_llama)
    alone.add_request("x", prompt, params)
    alone_tokens = []
    while alone.has_unfinished_requests():
        for out in alone.step():
            alone_tokens.extend(out.new_token_ids)
    busy = make_engine(tiny_hf_llama, num_blocks=256)
    others = random_prompts(16, 256, seed=12)
    for i, other in enumerate(others):
        busy.add_request(f"o{i}", other, SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True))
    busy.step()
    busy.add_request("x", prompt, params)
    busy_tokens = []
    while busy.has_unfinished_requests():
        for out in busy.step():
            if out.request_id == "x":
                busy_tokens.extend(out.new_token_ids)
    assert len(alone_tokens) == 16 and busy_tokens == alone_tokens


def test_int8_quantized_model_stays_close_to_float32(tiny_hf_llama):
    from llmserve.ops.int8_linear import quantize_linears_int8

    engine = make_engine(tiny_hf_llama)
    prompt = random_prompts(1, 256, seed=21)[0]
    ref = hf_logits(tiny_hf_llama, prompt)[-1]
    quantize_linears_int8(engine.runner.model)
    with torch.no_grad():
        logits = engine.runner.model.compute_logits(prefill_hidden(engine, prompt)[-1:])[0]
    error = ((logits - ref).norm() / ref.norm()).item()
    assert 0 < error < 0.05, f"int8 logits error {error}"
