"""bfloat16 and float16 on CPU against HuggingFace in the same dtype, and the kernels each dtype gets.

The native half-precision path rounds where HF rounds (RoPE in the model dtype, attention
through the same SDPA kernel, q.k kept in float32), so a request computed alone gives HF's
logits bit for bit. In a batch the GEMM library may round a row differently from HF's
one-row decode; the match rates below say how much that costs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from llmserve.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig
from llmserve.engine.engine import Engine
from llmserve.ops import cpu_kernels, fused
from llmserve.ops.attention import CPU_BACKEND, paged_attention
from llmserve.sampling_params import SamplingParams
from tests.conftest import make_hf_llama, native_from_hf, prefill_hidden
from tests.test_model_parity import hf_greedy, random_prompts, run_staggered
from tests.test_triton_attention import make_batch

SMOLLM2_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m-instruct"
HALF = [torch.bfloat16, torch.float16]
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def half_engine(hf_model, dtype: torch.dtype, enable_prefix_caching: bool = False) -> Engine:
    """An engine over `hf_model`'s float32 weights cast to `dtype` on load, as a real checkpoint is."""
    config, model = native_from_hf(hf_model, DTYPE_NAMES[dtype])
    engine_config = EngineConfig(
        model="in-memory", cache=CacheConfig(block_size=4, num_blocks=256, enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=256), device=DeviceConfig("cpu", DTYPE_NAMES[dtype]))
    return Engine(model, config, engine_config)


def match_rate(got: list[list[int]], expected: list[list[int]]) -> float:
    return sum(g == e for g, e in zip(got, expected, strict=True)) / len(expected)


def one_at_a_time(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    return [run_staggered(engine, [prompt], max_tokens)["r0"] for prompt in prompts]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(float32 HF model, {dtype: the same checkpoint loaded by HF in dtype}).

    Through from_pretrained, as users load it: `model.to(bf16)` would also round HF's RoPE
    inv_freq buffer, which from_pretrained keeps in float32.
    """
    from transformers import LlamaForCausalLM

    hf_model = make_hf_llama(seed=2, vocab_size=512)
    path = tmp_path_factory.mktemp("tiny-llama")
    hf_model.save_pretrained(path)
    return hf_model, {dtype: LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval() for dtype in HALF}


# ---- tiny random model (fast) ---------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_prefill_logits_equal_hf_bit_for_bit(tiny_pair, dtype):
    hf_model, cast = tiny_pair
    engine = half_engine(hf_model, dtype)
    tokens = random_prompts(1, 512, seed=5)[0]
    with torch.no_grad():
        logits = engine.runner.model.compute_logits(prefill_hidden(engine, tokens))
        expected = cast[dtype](torch.tensor([tokens])).logits[0]
    assert logits.dtype == dtype
    assert torch.equal(logits, expected), f"max difference {(logits.float() - expected.float()).abs().max()}"


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_greedy_match_rate_one_request_at_a_time(tiny_pair, dtype):
    # Every op rounds as HF's does, so each request alone must give HF generate's tokens:
    # rate 1.0 over 10 prompts x 16 tokens (bf16 near-ties included, they break the same way).
    hf_model, cast = tiny_pair
    prompts = random_prompts(10, 512, seed=7)
    got = one_at_a_time(half_engine(hf_model, dtype), prompts, 16)
    rate = match_rate(got, [hf_greedy(cast[dtype], prompt, 16) for prompt in prompts])
    assert rate == 1.0, f"{dtype}: {rate:.0%} of prompts equal HF generate"


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_greedy_match_rate_with_in_flight_batching(tiny_pair, dtype):
    # Batched rows can round differently in the GEMMs than HF's one-row decode; at this size
    # none did (rate 1.0 measured). At least 0.8 keeps a platform's GEMM choice from failing CI
    # while a real mistake (a wrong rounding step) drops the rate far lower.
    hf_model, cast = tiny_pair
    prompts = random_prompts(10, 512, seed=8)
    got = run_staggered(half_engine(hf_model, dtype, enable_prefix_caching=True), prompts, 16)
    rate = match_rate([got[f"r{i}"] for i in range(len(prompts))],
                      [hf_greedy(cast[dtype], prompt, 16) for prompt in prompts])
    assert rate >= 0.8, f"{dtype}: {rate:.0%} of prompts equal HF generate"


# ---- kernels per dtype ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_rope_rounds_like_hf_in_the_model_dtype(dtype):
    x = torch.randn(7, 5, 64).to(dtype)  # [T, H, D]
    freqs = torch.outer(torch.arange(7, dtype=torch.float32), torch.rand(32))
    cos, sin = freqs.cos(), freqs.sin()  # [T, D/2] float32, as the model's tables
    ours = x.clone()
    fused.rope_(ours, torch.arange(7), cos, sin)
    full_cos, full_sin = torch.cat([cos, cos], -1).to(dtype), torch.cat([sin, sin], -1).to(dtype)
    expected, _ = apply_rotary_pos_emb(x.transpose(0, 1), x.transpose(0, 1), full_cos, full_sin, unsqueeze_dim=0)
    assert torch.equal(ours, expected.transpose(0, 1))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_inputs_take_the_torch_twins_and_stay_close_to_the_float32_c_kernels(dtype):
    if cpu_kernels.load() is None:
        pytest.skip("no C compiler")
    x, residual, w = torch.randn(9, 576), torch.randn(9, 576), 1 + 0.1 * torch.randn(576)
    assert cpu_kernels.usable(x) and not cpu_kernels.usable(x.to(dtype))
    out, total = fused.add_rms_norm(x.to(dtype), residual.to(dtype), w.to(dtype), 1e-5)
    ref_out, ref_total = fused.add_rms_norm(x, residual.clone(), w, 1e-5)  # the C kernel
    assert out.dtype == total.dtype == dtype
    assert rel_error(total, ref_total) < 1e-2 and rel_error(out, ref_out) < 2e-2
    gate_up = torch.randn(9, 2 * 1536)
    act = fused.silu_and_mul(gate_up.to(dtype))
    assert act.dtype == dtype and rel_error(act, fused.silu_and_mul(gate_up)) < 1e-2


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_paged_attention_matches_float32_for_decodes_prompts_and_chunks(dtype):
    # decodes, whole prompts, and chunks after cached tokens (the masked SDPA call)
    specs = [(1, 50), (1, 7), (37, 37), (16, 80), (1, 1), (5, 6)]
    q, k_cache, v_cache, meta = make_batch(specs, num_decodes=2, dtype=dtype, device="cpu")
    out = CPU_BACKEND.attend(q, k_cache, v_cache, meta, 0.125)  # falls back from the C kernels
    assert out.dtype == dtype
    expected = paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, 0.125)
    assert rel_error(out, expected) < 1e-2


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ---- the default model (slow) -----------------------------------------------------------
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "How many legs does a spider have?",
             "Explain photosynthesis in one sentence.", "What is 2+2?", "Name three primary colors.",
             "Who wrote Romeo and Juliet?", "Translate 'hello' to Spanish.", "What is the boiling point of water?",
             "Give me a synonym for happy.", "Describe a cat.", "What is the largest planet?", "Tell me a joke.",
             "What does DNA stand for?", "List two fruits.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def smollm2_bf16():
    """(our bf16 LLM without prefix caching, HF's bf16 model, chat prompts as token ids)."""
    if not (SMOLLM2_DIR / ".complete").exists():
        pytest.skip("the default model is not materialised")
    from transformers import AutoModelForCausalLM

    from llmserve.llm import LLM

    llm = LLM(str(SMOLLM2_DIR), dtype="bfloat16", max_model_len=512, enable_prefix_caching=False)
    hf_model = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=torch.bfloat16).eval()
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    return llm, hf_model, prompts


@pytest.mark.slow
def test_smollm2_bf16_forward_equals_hf_bf16(smollm2_bf16):
    llm, hf_model, prompts = smollm2_bf16
    with torch.no_grad():
        logits = llm.engine.runner.model.compute_logits(prefill_hidden(llm.engine, prompts[3]))
        expected = hf_model(torch.tensor([prompts[3]])).logits[0]
    assert torch.equal(logits, expected), f"max difference {(logits.float() - expected.float()).abs().max()}"


@pytest.mark.slow
def test_smollm2_bf16_greedy_match_rate(smollm2_bf16):
    # 16 chat prompts x 32 tokens. Alone: measured 16/16; at least 15/16 (the arithmetic is
    # HF's, one prompt of slack for a platform's kernel choice). All 16 in one batch: measured
    # 10/16, because batched GEMM rows round differently from HF's one-row decode and bf16
    # greedy decoding amplifies one ulp; HF itself, batched vs alone, agreed on 8/16 here. So
    # at least 8/16 batched. (Before the fix: 9/16 batched; float16 gives 16/16 both ways.)
    llm, hf_model, prompts = smollm2_bf16
    params = SamplingParams(temperature=0.0, max_tokens=32)
    expected = [hf_greedy(hf_model, prompt, 32) for prompt in prompts]
    alone = [llm.generate([prompt], params)[0].outputs[0].token_ids for prompt in prompts]
    batched = [result.outputs[0].token_ids for result in llm.generate(prompts, params)]
    alone_rate, batched_rate = match_rate(alone, expected), match_rate(batched, expected)
    assert alone_rate >= 15 / 16, f"alone: {alone_rate:.0%} of prompts equal HF bf16 generate"
    assert batched_rate >= 8 / 16, f"batched: {batched_rate:.0%} of prompts equal HF bf16 generate"


@pytest.mark.slow
def test_smollm2_bf16_answers_paris(smollm2_bf16):
    llm = smollm2_bf16[0]
    result = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0.0, max_tokens=32))[0]
    assert "Paris" in result.outputs[0].text
