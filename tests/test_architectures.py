"""Supported families (LLaMA, Mistral, Qwen2) against HuggingFace, and everything else refused by name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (GPT2Config, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from llmserve.checkpoint import names
from llmserve.checkpoint.architectures import UnsupportedModelError
from llmserve.checkpoint.convert import convert_checkpoint
from llmserve.checkpoint.hf import HFCheckpoint
from llmserve.checkpoint.model_config import ModelConfig
from llmserve.checkpoint.reference import reference_forward
from llmserve.checkpoint.trtllm_format import TrtllmCheckpoint
from llmserve.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig
from llmserve.engine.engine import Engine
from llmserve.models.loader import load_model
from tests.conftest import prefill_hidden
from tests.test_model_parity import hf_greedy, hf_logits, random_prompts, run_staggered

SUPPORTED = "llmserve runs LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
}


def make_family(family: str, seed: int = 0, **overrides):
    """A tiny random HF model of `family`, every weight random (biases too, so a dropped one shows)."""
    config_cls, model_cls, defaults = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **defaults, **overrides})).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.5 if name.endswith("bias") else 0.15
            param.copy_(1 + 0.1 * torch.randn_like(param) if "norm" in name else scale * torch.randn_like(param))
    return model


def save_family(tmp_path, family: str, **overrides):
    model = make_family(family, **overrides)
    path = tmp_path / family
    model.save_pretrained(path)
    return path, model


def engine_from_dir(path, max_num_batched_tokens: int = 256) -> Engine:
    config, model = load_model(path)
    engine_config = EngineConfig(model=str(path), cache=CacheConfig(block_size=4, num_blocks=128),
                                 scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens),
                                 device=DeviceConfig("cpu", "float32"))
    return Engine(model, config, engine_config)


# ---- accepted families: parity with HF generate -------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_greedy_tokens_equal_hf_generate(tmp_path, family):
    path, hf_model = save_family(tmp_path, family)
    prompts = random_prompts(6, TINY["vocab_size"])
    got = run_staggered(engine_from_dir(path, max_num_batched_tokens=9), prompts, max_tokens=10)  # chunked too
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}"] == hf_greedy(hf_model, prompt, 10), f"{family} request {i} diverged"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_prefill_logits_match_hf(tmp_path, family):
    path, hf_model = save_family(tmp_path, family)
    engine = engine_from_dir(path)
    tokens = random_prompts(1, TINY["vocab_size"], seed=4)[0]
    with torch.no_grad():
        logits = engine.runner.model.compute_logits(prefill_hidden(engine, tokens))
    torch.testing.assert_close(logits, hf_logits(hf_model, tokens), rtol=1e-4, atol=1e-4)


def test_qwen2_reads_its_qkv_biases(tmp_path):
    path, _ = save_family(tmp_path, "qwen2")
    config = HFCheckpoint(path).config
    assert (config.architecture, config.attn_bias) == ("Qwen2ForCausalLM", True)
    _, model = load_model(path)
    assert model.transformer.layers[0].attention.qkv.bias.abs().sum() > 0


def test_mistral_sliding_window_caps_the_context(tmp_path, caplog):
    path, hf_model = save_family(tmp_path, "mistral", sliding_window=24)
    with caplog.at_level("WARNING"):
        engine = engine_from_dir(path)
    assert engine.runner.config.max_position_embeddings == 24 and engine.max_model_len == 24
    assert "sliding window of 24 tokens" in caplog.text
    # Inside the window HF's sliding attention is full attention: the tokens agree exactly.
    prompts = random_prompts(4, TINY["vocab_size"], seed=6)
    prompts = [p[:12] for p in prompts]
    got = run_staggered(engine, prompts, max_tokens=10)
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}"] == hf_greedy(hf_model, prompt, 10)


def test_qwen2_sliding_window_only_counts_when_enabled():
    hf = {**Qwen2Config(**TINY).to_dict(), "sliding_window": 32}  # as Qwen2 configs on disk carry it
    assert ModelConfig.from_hf({**hf, "use_sliding_window": False}).max_position_embeddings == 256
    assert ModelConfig.from_hf({**hf, "use_sliding_window": True}).max_position_embeddings == 32


# ---- the q/k/v bias through the converter ---------------------------------------------
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 2), (2, 2)])
def test_qwen2_bias_survives_tp_pp_shards(tmp_path, tp, pp):
    path, hf_model = save_family(tmp_path, "qwen2")
    out = convert_checkpoint(path, tmp_path / "converted", tp, pp, progress=False)
    data = json.loads((out / "config.json").read_text())
    assert (data["architecture"], data["attn_bias"], data["qwen_type"]) == ("Qwen2ForCausalLM", True, "qwen2")
    checkpoint = TrtllmCheckpoint(out)
    q_heads = 4 // tp
    kv_heads = max(1, 2 // tp)  # tp=4 duplicates each KV head onto two ranks, bias rows with it
    bias = checkpoint.rank_tensors(0)["transformer.layers.0.attention.qkv.bias"]
    assert bias.shape == ((q_heads + 2 * kv_heads) * 16,)
    tokens = random_prompts(1, TINY["vocab_size"], seed=8)[0]
    expected = hf_logits(hf_model, tokens)
    torch.testing.assert_close(reference_forward(checkpoint, tokens), expected, rtol=1e-4, atol=1e-4)
    merged = dict(checkpoint.merged_tensors())
    single = dict(HFCheckpoint(path).trtllm_tensors())
    assert merged.keys() == single.keys() and "transformer.layers.1.attention.qkv.bias" in merged
    assert all(torch.equal(merged[name], single[name]) for name in single)
    engine = engine_from_dir(out)
    with torch.no_grad():
        logits = engine.runner.model.compute_logits(prefill_hidden(engine, tokens))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


# ---- refused by name ------------------------------------------------------------------
def test_unsupported_model_error_is_a_value_error():
    assert issubclass(UnsupportedModelError, ValueError)  # the CLI prints ValueErrors as one line


def test_gpt2_is_refused_naming_what_is_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**GPT2Config(n_layer=1).to_dict(),
                                                      "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError) as error:
        HFCheckpoint(tmp_path)
    assert str(error.value) == f"GPT2LMHeadModel (model_type gpt2) is not supported; {SUPPORTED}"


def test_cli_convert_of_gpt2_prints_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                               "model_type": "gpt2", "n_head": 12}))
    proc = subprocess.run([sys.executable, "-m", "llmserve.cli", "convert", "--model", str(tmp_path / "gpt2"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"error: GPT2LMHeadModel (model_type gpt2) is not supported; {SUPPORTED}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides,message", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling type 'yarn' is not supported"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope scaling type 'dynamic' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(attention_bias=True), "LlamaForCausalLM with attention_bias=true is not supported"),
    (dict(mlp_bias=True), "LlamaForCausalLM with mlp_bias=true is not supported"),
    (dict(quantization_config={"quant_method": "awq"}), r"quantized checkpoints \(quant_method awq\)"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5 is not supported"),
])
def test_unimplemented_config_features_are_refused(overrides, message):
    hf = {**LlamaConfig(**TINY).to_dict(), "architectures": ["LlamaForCausalLM"], **overrides}
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf(hf)


def test_llama_checkpoint_with_bias_tensors_is_refused(tmp_path):
    path, _ = save_family(tmp_path, "llama", attention_bias=True)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "attention_bias": False}))
    # q/k/v/o biases of both layers, named
    with pytest.raises(UnsupportedModelError, match=r"holds 8 tensors that LlamaForCausalLM as configured would not "
                                                    r"use \(model\.layers\.0\.self_attn\.k_proj\.bias, "):
        HFCheckpoint(path)


def test_qwen2_checkpoint_without_its_biases_is_refused(tmp_path):
    path, _ = save_family(tmp_path, "qwen2")
    tensors = load_file(path / "model.safetensors")
    save_file({n: t for n, t in tensors.items() if "q_proj.bias" not in n}, path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 2 tensors that Qwen2ForCausalLM needs: model\.layers\.0\.self_attn"):
        HFCheckpoint(path)


def test_rotary_inv_freq_buffers_and_a_tied_lm_head_are_ignored_by_name(tmp_path):
    path, hf_model = save_family(tmp_path, "llama", tie_word_embeddings=True)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    tensors[names.HF_LM_HEAD] = tensors[names.HF_EMBEDDING].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    engine = engine_from_dir(path)
    tokens = random_prompts(1, TINY["vocab_size"], seed=3)[0]
    with torch.no_grad():
        logits = engine.runner.model.compute_logits(prefill_hidden(engine, tokens))
    torch.testing.assert_close(logits, hf_logits(hf_model, tokens), rtol=1e-4, atol=1e-4)


def test_converted_rank_file_with_an_extra_tensor_is_refused(tmp_path):
    path, _ = save_family(tmp_path, "llama")
    out = convert_checkpoint(path, tmp_path / "converted", 2, 1, progress=False)
    shard = load_file(out / "rank1.safetensors")
    shard["transformer.layers.0.attention.qkv.bias"] = torch.zeros(64)
    save_file(shard, out / "rank1.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match=r"rank1\.safetensors holds 1 tensors that LlamaForCausalLM as "
                                                    r"configured would not use \(transformer\.layers\.0\.attention"):
        TrtllmCheckpoint(out)


def test_converted_checkpoint_of_an_unsupported_architecture_is_refused(tmp_path):
    path, _ = save_family(tmp_path, "llama")
    out = convert_checkpoint(path, tmp_path / "converted", progress=False)
    data = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**data, "architecture": "GPTForCausalLM"}))
    with pytest.raises(UnsupportedModelError, match=f"GPTForCausalLM is not supported; {SUPPORTED}"):
        TrtllmCheckpoint(out)
