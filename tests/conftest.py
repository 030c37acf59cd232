"""Shared factories: tiny random LLaMAs (HF and native) and engines over them."""

from __future__ import annotations

import json

import pytest
import torch

from llmserve.checkpoint.model_config import ModelConfig
from llmserve.checkpoint.names import hf_to_trtllm_single_rank
from llmserve.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig
from llmserve.models.loader import build_model

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def make_hf_llama(seed: int = 0, **overrides):
    """A tiny random HF LlamaForCausalLM in float32 (GQA by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields)).float().eval()
    return model


def native_from_hf(hf_model, dtype: str = "float32"):
    """The native model holding the same weights as `hf_model`."""
    config = ModelConfig.from_hf(hf_model.config.to_dict())
    state = hf_model.state_dict()
    model = build_model(config, "cpu", dtype)
    model.load_weights(hf_to_trtllm_single_rank(state.__getitem__, config.num_hidden_layers,
                                                config.tie_word_embeddings))
    return config, model


def make_engine(hf_model, *, num_blocks: int = 64, block_size: int = 4, max_num_batched_tokens: int = 256,
                max_num_seqs: int = 32, tokenizer=None, enable_prefix_caching: bool = True,
                async_scheduling: bool | None = None):
    """An engine over the native twin of `hf_model`, with a small pool by default."""
    from llmserve.engine.engine import Engine

    config, model = native_from_hf(hf_model)
    engine_config = EngineConfig(
        model="in-memory",
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                          enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                  async_scheduling=async_scheduling),
        device=DeviceConfig("cpu", "float32"))
    # the core finds the tokenizer by path, for grammars (structured outputs)
    tokenizer_path = getattr(tokenizer, "name_or_path", None) or None
    engine = Engine(model, config, engine_config, tokenizer=tokenizer, tokenizer_path=tokenizer_path)
    engine.hf_source = hf_model  # what a parallel test core loads (LLMSERVE_TEST_TP)
    return engine


def prefill_hidden(engine, tokens: list[int]) -> torch.Tensor:
    """Final hidden states [T, E] of one prompt, run as a single prefill step of `engine`."""
    from llmserve.core.scheduler_output import single_prefill
    from llmserve.core.sequence import Sequence
    from llmserve.sampling_params import SamplingParams

    seq = Sequence("prefill", tokens, SamplingParams(), max_output_tokens=1)
    engine.kv.allocate_slots(seq, len(tokens))
    step = single_prefill("prefill", tokens, SamplingParams(), seq.block_table)
    step.finished_request_ids.append("prefill")  # the runner forgets an earlier call's request of that name
    runner = engine.runner
    batch = runner.prepare_inputs(step)
    with torch.no_grad():
        return runner.model(batch.input_ids, batch.positions, runner.kv_caches, batch.meta)


@pytest.fixture(scope="session")
def tiny_hf_llama():
    return make_hf_llama()


@pytest.fixture(scope="module")
def tokenizer():
    """The default model's tokenizer (server tests pair it with tiny random models)."""
    from tests.server_helpers import smollm2_tokenizer_or_none

    tokenizer = smollm2_tokenizer_or_none()
    if tokenizer is None:
        pytest.skip("the default model's tokenizer is not materialised")
    return tokenizer


# ---- quantization tests ---------------------------------------------------------------------
CALIBRATION_TEXTS = [
    "The committee met on Tuesday to discuss the new budget for the city's public libraries.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "She walked along the river, watching the boats drift slowly towards the harbour at dusk.",
    "To install the package, run pip install and then restart the server before testing.",
    "The recipe calls for two cups of flour, one egg, a pinch of salt and some warm milk.",
    "In 1969 the first humans landed on the Moon, an event watched by millions on television.",
    "Error 404 means the server could not find the page you asked for; check the address.",
]


@pytest.fixture(scope="module")
def quantization_source(tmp_path_factory, tokenizer):
    """A tiny random HF LLaMA over the default model's tokenizer, its folder, and a calibration set."""
    from llmserve.quantization.calibrate import CalibrationConfig

    hf = make_hf_llama(seed=3, vocab_size=len(tokenizer))
    path = tmp_path_factory.mktemp("fp8-source")
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    calib = path.parent / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": text}) + "\n" for text in CALIBRATION_TEXTS))
    return hf, path, CalibrationConfig(f"jsonl:{calib}", size=8, seq_len=64, device="cpu")
