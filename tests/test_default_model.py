"""End-to-end on the real default model (SmolLM2-135M-Instruct): parity, API, CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from llmserve.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig
from llmserve.engine.engine import Engine, load_tokenizer
from llmserve.llm import LLM
from llmserve.models.loader import load_model
from llmserve.sampling_params import SamplingParams
from tests.test_model_parity import run_staggered

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "Who wrote Romeo and Juliet? Answer briefly, and then explain in one sentence why the play is famous.",
    "Translate 'good morning' to Spanish.",
    "List the planets of the solar system in order from the sun.",
    "Give me a short tip for learning to program.",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def default_dir():
    from llmserve.checkpoint.pull import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="module")
def hf_model(default_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def loaded(default_dir):
    config, model = load_model(default_dir)
    return config, model, load_tokenizer(default_dir)


def make_llm(loaded, **cache) -> LLM:
    config, model, tokenizer = loaded
    cache_config = CacheConfig(block_size=16, num_blocks=cache.pop("num_blocks", 512))
    engine_config = EngineConfig(model="default", cache=cache_config,
                                 scheduler=SchedulerConfig(max_num_batched_tokens=cache.pop("budget", 2048)),
                                 device=DeviceConfig("cpu", "float32"))
    return LLM(engine=Engine(model, config, engine_config, tokenizer=tokenizer))


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def staggered_greedy(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Request i arrives at engine step i; returns each request's tokens."""
    tokens = run_staggered(llm.engine, prompts, max_tokens)
    assert llm.engine.kv.num_used_blocks == 0
    return [tokens[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("variant", ["chunked-prefill", "preemption"])
def test_greedy_matches_hf_generate(loaded, hf_model, variant):
    tokenizer = loaded[2]
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS]
    max_tokens = 24
    if variant == "chunked-prefill":
        llm = make_llm(loaded, budget=32)
    else:  # 14 blocks of 16 = 224 slots for 9 sequences of ~40-60 tokens: must preempt
        llm = make_llm(loaded, num_blocks=14)
    got = staggered_greedy(llm, prompts, max_tokens)
    if variant == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    for question, prompt, tokens in zip(QUESTIONS, prompts, got):
        assert tokens == hf_greedy(hf_model, prompt, max_tokens), question


def test_chat_answers_paris_and_template_has_one_bos(loaded):
    llm = make_llm(loaded)
    result = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0.0, max_tokens=32))[0]
    assert "Paris" in result.outputs[0].text
    assert result.outputs[0].finish_reason == "stop"
    bos = llm.tokenizer.bos_token_id
    assert result.prompt_token_ids[:2] != [bos, bos], "double BOS: the template already emits it"


def test_seeded_request_same_alone_and_in_batch_of_16(loaded):
    llm = make_llm(loaded)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=24)
    question = "Tell me a story about a dragon."
    alone = llm.chat([{"role": "user", "content": question}], params)[0].outputs[0].text
    others = [[{"role": "user", "content": f"Count to {i}."}] for i in range(16)]
    batch = llm.chat(others + [[{"role": "user", "content": question}]] ,
                     [SamplingParams(temperature=1.0, max_tokens=24)] * 16 + [params])
    assert batch[-1].outputs[0].text == alone and alone


def test_generate_cli_answers_paris():
    proc = subprocess.run(
        [sys.executable, "-m", "llmserve.cli", "generate", "--model", "default", "--chat",
         "--prompt", "What is the capital of France?", "--temperature", "0", "--max-tokens", "32"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_converted_default_model_gives_the_same_greedy_text(loaded, default_dir, tmp_path):
    from llmserve.checkpoint.convert import convert_checkpoint

    converted = convert_checkpoint(default_dir, tmp_path / "trtllm", tp_size=1, pp_size=1, dtype="float32",
                                   progress=False)
    config, model = load_model(converted)
    engine_config = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=256), device=DeviceConfig("cpu", "float32"))
    from_converted = LLM(engine=Engine(model, config, engine_config, tokenizer=load_tokenizer(converted)))
    from_hf = make_llm(loaded)
    params = SamplingParams(temperature=0.0, max_tokens=32)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS[:4]]
    got = [r.outputs[0].text for r in from_converted.chat(conversations, params)]
    assert got == [r.outputs[0].text for r in from_hf.chat(conversations, params)]
    assert "Paris" in got[0]
