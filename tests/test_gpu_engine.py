"""The native runtime on CUDA: parity with HF, CUDA graphs vs eager (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from llmserve.checkpoint.model_config import ModelConfig
from llmserve.checkpoint.names import hf_to_trtllm_single_rank
from llmserve.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig
from llmserve.engine.engine import Engine
from llmserve.worker.model_runner import kv_bytes_per_block, kv_cache_dtype
from llmserve.models.loader import build_model
from llmserve.sampling_params import SamplingParams
from tests.conftest import make_hf_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPE = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)


def cuda_engine(hf_model, dtype: str, enforce_eager: bool, block_size: int = 16,
                async_scheduling: bool | None = None, kv_cache_dtype: str = "auto") -> Engine:
    config = ModelConfig.from_hf(hf_model.config.to_dict())
    model = build_model(config, "cuda", dtype)
    state = {k: v.cuda() for k, v in hf_model.state_dict().items()}
    model.load_weights(hf_to_trtllm_single_rank(state.__getitem__, config.num_hidden_layers,
                                                config.tie_word_embeddings))
    engine_config = EngineConfig(
        cache=CacheConfig(block_size=block_size, num_blocks=512, kv_cache_dtype=kv_cache_dtype),
        scheduler=SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=32, max_model_len=1024,
                                  async_scheduling=async_scheduling),
        device=DeviceConfig("cuda", dtype, enforce_eager=enforce_eager))
    return Engine(model, config, engine_config)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1024, (int(n),), generator=gen).tolist()
            for n in torch.randint(4, 200, (count,), generator=gen)]


def run(engine: Engine, batch: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    tokens = {}
    for i, prompt in enumerate(batch):  # staggered arrivals: one new request per step
        engine.add_request(f"g{i}", prompt, params)
        tokens[f"g{i}"] = []
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    assert engine.kv.num_used_blocks == 0
    return [tokens[f"g{i}"] for i in range(len(batch))]


def hf_greedy(hf_model, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                min_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_float32_greedy_matches_hf_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    hf_model = make_hf_llama(seed=3, **SHAPE)
    engine = cuda_engine(hf_model, "float32", enforce_eager=False)
    hf_model = hf_model.cuda()
    batch = prompts(12)
    got = run(engine, batch, 24)
    divergences = [first_divergence(g, hf_greedy(hf_model, p, 24)) for g, p in zip(got, batch)]
    print("float32 first divergence per sequence:", divergences)
    assert sum(d == 24 for d in divergences) >= 11, divergences


def test_bfloat16_greedy_mostly_matches_hf():
    hf_model = make_hf_llama(seed=4, **SHAPE)
    engine = cuda_engine(hf_model, "bfloat16", enforce_eager=False)
    hf_model = hf_model.to("cuda", torch.bfloat16)
    batch = prompts(16, seed=1)
    got = run(engine, batch, 32)
    divergences = [first_divergence(g, hf_greedy(hf_model, p, 32)) for g, p in zip(got, batch)]
    print("bfloat16 first divergence per sequence:", divergences)
    assert sum(d == 32 for d in divergences) >= len(batch) // 2, divergences


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_give_the_same_tokens_as_eager(dtype):
    hf_model = make_hf_llama(seed=5, **SHAPE)
    batch = prompts(20, seed=2)
    eager = run(cuda_engine(hf_model, dtype, enforce_eager=True), batch, 40)
    graphed_engine = cuda_engine(hf_model, dtype, enforce_eager=False)
    assert graphed_engine.runner.graphs is not None
    assert run(graphed_engine, batch, 40) == eager


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_async_scheduling_gives_the_same_tokens_as_sync(dtype):
    hf_model = make_hf_llama(seed=7, **SHAPE)
    batch = prompts(20, seed=3)
    sync = run(cuda_engine(hf_model, dtype, enforce_eager=False, async_scheduling=False), batch, 40)
    overlapped = cuda_engine(hf_model, dtype, enforce_eager=False)
    assert overlapped.async_scheduling, "async scheduling is the CUDA default"
    assert run(overlapped, batch, 40) == sync


def test_fp8_kv_cache_mostly_keeps_bf16_greedy_tokens():
    hf_model = make_hf_llama(seed=8, **SHAPE)
    batch = prompts(16, seed=4)
    bf16 = run(cuda_engine(hf_model, "bfloat16", enforce_eager=False), batch, 32)
    engine = cuda_engine(hf_model, "bfloat16", enforce_eager=False, kv_cache_dtype="fp8")
    assert engine.runner.kv_cache.dtype == torch.float8_e4m3fn
    fp8 = run(engine, batch, 32)
    divergences = [first_divergence(a, b) for a, b in zip(fp8, bf16)]
    print("fp8 KV vs bf16 KV, first divergence per sequence:", divergences)
    assert sum(d >= 8 for d in divergences) >= len(batch) // 2, divergences


def test_fp8_kv_cache_holds_twice_the_blocks_of_bf16():
    per_block = {dtype: kv_bytes_per_block(ModelConfig.from_hf(make_hf_llama(**SHAPE).config.to_dict()), 16,
                                           kv_cache_dtype(CacheConfig(kv_cache_dtype=dtype), DeviceConfig("cuda", "bfloat16")))
                 for dtype in ("auto", "fp8")}
    assert per_block["auto"] == 2 * per_block["fp8"]


def test_kv_cache_sized_from_free_memory():
    hf_model = make_hf_llama(seed=6, **SHAPE)
    config = ModelConfig.from_hf(hf_model.config.to_dict())
    model = build_model(config, "cuda", "bfloat16")
    engine_config = EngineConfig(
        cache=CacheConfig(block_size=16, gpu_memory_utilization=0.5),
        scheduler=SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=8, max_model_len=1024),
        device=DeviceConfig("cuda", "bfloat16", enforce_eager=True))
    engine = Engine(model, config, engine_config)
    kv_bytes = engine.runner.kv_cache.numel() * engine.runner.kv_cache.element_size()
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0.3 * total < kv_bytes < 0.5 * total


def test_after_warm_up_a_staggered_workload_compiles_no_kernel():
    """The start-up warm-up covers every Triton variant a real workload needs: staggered arrivals make eager
    mixed steps with every decode count, table width and slice offset, and none of them compiles."""
    triton = pytest.importorskip("triton")
    knobs = getattr(getattr(triton, "knobs", None), "runtime", None)
    if knobs is None or not hasattr(knobs, "jit_post_compile_hook"):
        pytest.skip("this Triton has no compile hook to count compilations with")
    from llmserve.engine.warmup import warm_up

    engine = cuda_engine(make_hf_llama(0, **SHAPE).to(torch.bfloat16), "bfloat16", enforce_eager=False)
    warm_up(engine.core)
    compiled = []
    knobs.jit_post_compile_hook = lambda **info: compiled.append(info["fn"].name)
    try:
        run(engine, prompts(48, seed=5), max_tokens=24)
    finally:
        knobs.jit_post_compile_hook = None
    assert compiled == []


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prompt_logprobs_and_logit_bias_on_cuda(async_scheduling):
    """The CUDA path of prompt scoring (chunked, beside other requests) and of logit_bias."""
    hf_model = make_hf_llama(0, **SHAPE).cuda()
    engine = cuda_engine(hf_model, "float32", enforce_eager=False, async_scheduling=async_scheduling)
    prompt = prompts(1, seed=9)[0]
    while len(prompt) < 600:  # longer than a 512-token step: scored in two chunks
        prompt = prompt + prompt
    engine.add_request("other", prompts(1, seed=3)[0], SamplingParams(temperature=0.0, max_tokens=20))
    engine.add_request("scored", prompt, SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2,
                                                        logit_bias={7: 100.0}))
    got, tokens = None, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "scored":
                tokens += out.new_token_ids
                got = out.prompt_logprobs if out.prompt_logprobs is not None else got
    with torch.no_grad():
        want = torch.log_softmax(hf_model(torch.tensor([prompt], device="cuda")).logits[0].float(), dim=-1)
    assert len(got) == len(prompt) - 1
    assert [t.logprob for t in got] == pytest.approx(
        [want[p - 1, prompt[p]].item() for p in range(1, len(prompt))], abs=1e-3)
    assert tokens == [7, 7, 7]
    assert engine.kv.num_used_blocks == 0
