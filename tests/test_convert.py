"""HF LLaMA -> TensorRT-LLM checkpoint: split rules, layout, round trip, and logits vs HuggingFace."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from llmserve.checkpoint import names
from llmserve.checkpoint.convert import (Mapping, convert_checkpoint, num_rank_tensors, pad_and_split_lm_head,
                                         rank_tensors, split_qkv, validate_mapping)
from llmserve.checkpoint.model_config import ModelConfig
from llmserve.checkpoint.reference import reference_forward
from llmserve.checkpoint.trtllm_format import TrtllmCheckpoint, is_trtllm_checkpoint

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
TINY_MODELS = {
    # KV heads < tp at tp 2 and 4, vocab not divisible by tp, odd layer count, separate lm_head.
    "gqa1-untied-5layers": dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                                num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False),
    # KV heads < tp at tp 4, tied embeddings, llama3 RoPE scaling with all three frequency bands.
    "gqa2-tied-llama3": dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             rope_scaling=LLAMA3_SCALING),
    # KV heads >= tp everywhere, a different rope base.
    "gqa4-untied": dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
                        rope_theta=500000.0),
}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja"]
NUM_TOKENS = 19


def make_hf_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A tiny float32 LLaMA whose every weight, norms included, is random (so misplaced ones show)."""
    torch.manual_seed(seed)
    overrides = copy.deepcopy(overrides)  # LlamaConfig adds rope_theta to a rope_scaling dict in place
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=256, rms_norm_eps=1e-5, **overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if "norm" in name else 0.15 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (HF dir, token ids, HF logits [T, V]) for every tiny model."""
    built = {}
    for index, (name, overrides) in enumerate(TINY_MODELS.items()):
        model = make_hf_model(seed=index, **overrides)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        for file in TOKENIZER_FILES:
            (path / file).write_text("{}")
        (path / "README.md").write_text("not a tokenizer file")
        token_ids = torch.randint(0, overrides["vocab_size"], (NUM_TOKENS,), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            logits = model(token_ids[None]).logits[0]
        built[name] = (path, token_ids, logits)
    return built


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    """(name, tp, pp, dtype) -> converted dir, each conversion done once per module."""
    cache = {}

    def convert(name: str, tp: int, pp: int, dtype: str = "float32"):
        key = (name, tp, pp, dtype)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{name}-tp{tp}-pp{pp}-{dtype}")
            cache[key] = convert_checkpoint(hf_models[name][0], out, tp, pp, dtype, progress=False)
        return cache[key]

    return convert


def hf_single_rank_tensors(path, config: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    with safe_open(path / "model.safetensors", framework="pt") as f:
        return list(names.hf_to_trtllm_single_rank(f.get_tensor, config.num_hidden_layers, config.tie_word_embeddings))


@pytest.mark.parametrize("pp", [1, 2, 3])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_reference_forward_over_shards_matches_hf(hf_models, converted, name, tp, pp):
    _, token_ids, hf_logits = hf_models[name]
    logits = reference_forward(TrtllmCheckpoint(converted(name, tp, pp)), token_ids)
    assert logits.shape == hf_logits.shape
    relative_error = (logits - hf_logits).abs().max() / hf_logits.abs().max()
    assert relative_error <= 1e-4, f"max relative error {relative_error:.2e}"


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 3), (2, 2)])
@pytest.mark.parametrize("name", ["gqa1-untied-5layers", "gqa2-tied-llama3"])
def test_merged_tensors_round_trip_to_tp1(hf_models, converted, name, tp, pp):
    path = hf_models[name][0]
    expected = hf_single_rank_tensors(path, ModelConfig.from_dir(path))
    merged = list(TrtllmCheckpoint(converted(name, tp, pp)).merged_tensors())
    assert [n for n, _ in merged] == [n for n, _ in expected]
    for (merged_name, tensor), (_, want) in zip(merged, expected):
        assert torch.equal(tensor, want), merged_name


def test_rank_tensors_at_tp1_pp1_equal_single_rank_map(hf_models):
    path = hf_models["gqa2-tied-llama3"][0]
    config = ModelConfig.from_dir(path)
    with safe_open(path / "model.safetensors", framework="pt") as f:
        got = list(rank_tensors(f.get_tensor, config, Mapping(), 0, torch.float32))
    expected = hf_single_rank_tensors(path, config)
    assert [n for n, _ in got] == [n for n, _ in expected]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, expected))


def test_rank_files_layers_and_config_json(hf_models, converted):
    hf_path = hf_models["gqa1-untied-5layers"][0]
    out = converted("gqa1-untied-5layers", 2, 2)
    assert sorted(p.name for p in out.glob("rank*")) == [f"rank{r}.safetensors" for r in range(4)]
    ckpt = TrtllmCheckpoint(out)
    # 5 layers over 2 stages: tensor_split gives stage 0 layers 0-2, stage 1 layers 3-4, each renumbered from 0.
    for rank, num_layers, first, last in [(0, 3, True, False), (1, 3, True, False), (2, 2, False, True), (3, 2, False, True)]:
        tensors = ckpt.rank_tensors(rank)
        assert len(tensors) == num_rank_tensors(ckpt.config, ckpt.mapping, rank)
        layer_ids = {int(n.split(".")[2]) for n in tensors if n.startswith("transformer.layers.")}
        assert layer_ids == set(range(num_layers)), rank
        assert (names.TRT_EMBEDDING in tensors) == first
        assert (names.TRT_LM_HEAD in tensors) == last and (names.TRT_FINAL_NORM in tensors) == last
    data = json.loads((out / "config.json").read_text())
    assert data["mapping"] == {"world_size": 4, "tp_size": 2, "pp_size": 2}
    assert data["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}
    assert (data["architecture"], data["dtype"], data["logits_dtype"]) == ("LlamaForCausalLM", "float32", "float32")
    assert (data["position_embedding_type"], data["head_size"], data["num_key_value_heads"]) == ("rope_gpt_neox", 8, 1)
    assert (data["bos_token_id"], data["eos_token_id"]) == (1, [2])
    assert ckpt.config == ModelConfig.from_dir(hf_path)


def test_config_json_carries_rope_scaling_and_ties(converted):
    data = json.loads((converted("gqa2-tied-llama3", 1, 1) / "config.json").read_text())
    assert data["rotary_scaling"] == LLAMA3_SCALING and data["rotary_base"] == 10000.0
    assert data["tie_word_embeddings"] is True and data["norm_epsilon"] == 1e-5


def test_dtype_casts_every_tensor(converted):
    ckpt = TrtllmCheckpoint(converted("gqa2-tied-llama3", 2, 1, "bfloat16"))
    assert ckpt.config.dtype == "bfloat16"
    assert {t.dtype for r in range(2) for t in ckpt.rank_tensors(r).values()} == {torch.bfloat16}


def test_tokenizer_files_copied_and_others_not(hf_models, converted):
    out = converted("gqa2-tied-llama3", 1, 1)
    for file in [*TOKENIZER_FILES, "generation_config.json"]:
        assert (out / file).read_bytes() == (hf_models["gqa2-tied-llama3"][0] / file).read_bytes(), file
    assert not (out / "README.md").exists() and not (out / "model.safetensors").exists()


def test_is_trtllm_checkpoint(hf_models, converted):
    assert is_trtllm_checkpoint(converted("gqa4-untied", 1, 1))
    assert not is_trtllm_checkpoint(hf_models["gqa4-untied"][0])


@pytest.mark.parametrize("num_layers", range(1, 10))
def test_pp_layers_match_tensor_split(num_layers):
    for pp in range(1, num_layers + 1):
        mapping = Mapping(pp_size=pp)
        expected = [chunk.tolist() for chunk in torch.tensor_split(torch.arange(num_layers), pp)]
        assert [mapping.pp_layers(p, num_layers) for p in range(pp)] == expected


def test_rank_numbering_is_tp_major():
    mapping = Mapping(tp_size=4, pp_size=2)
    assert mapping.world_size == 8
    assert [(mapping.tp_rank(r), mapping.pp_rank(r)) for r in (0, 3, 4, 5, 7)] == [(0, 0), (3, 0), (0, 1), (1, 1), (3, 1)]
    assert mapping.rank(tp_rank=1, pp_rank=1) == 5
    with pytest.raises(ValueError, match="rank 8 outside"):
        mapping.tp_rank(8)
    with pytest.raises(ValueError):
        Mapping(tp_size=0)


def llama3_8b_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
    return ModelConfig(**{**fields, **overrides})


def meta_hf_getter(config: ModelConfig):
    """`get` for HF names returning meta tensors of the HF shapes: no memory, exact shapes."""
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    shapes = {
        "self_attn.q_proj.weight": (config.num_attention_heads * head_dim, hidden),
        "self_attn.k_proj.weight": (config.num_key_value_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (config.num_key_value_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, config.num_attention_heads * head_dim),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
    }

    def get(name: str) -> torch.Tensor:
        suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else None
        shape = shapes[suffix] if suffix else ((hidden,) if name == names.HF_FINAL_NORM else (config.vocab_size, hidden))
        return torch.empty(shape, device="meta", dtype=torch.bfloat16)

    return get


@pytest.mark.parametrize("tp,qkv_rows", [(1, 6144), (2, 3072), (8, 768), (16, 512)])
def test_llama3_8b_rank_shapes(tp, qkv_rows):
    config = llama3_8b_config()
    shards = [dict(rank_tensors(meta_hf_getter(config), config, Mapping(tp, 2), r, torch.float16))
              for r in range(2 * tp)]
    first, last = shards[0], shards[-1]
    assert first["transformer.layers.0.attention.qkv.weight"].shape == (qkv_rows, 4096)
    assert first["transformer.layers.15.attention.dense.weight"].shape == (4096, 4096 // tp)
    assert first["transformer.layers.0.mlp.fc.weight"].shape == (14336 // tp, 4096)
    assert first["transformer.layers.0.mlp.gate.weight"].shape == (14336 // tp, 4096)
    assert first["transformer.layers.0.mlp.proj.weight"].shape == (4096, 14336 // tp)
    assert first["transformer.layers.0.input_layernorm.weight"].shape == (4096,)
    assert first[names.TRT_EMBEDDING].shape == (128256, 4096)
    assert last[names.TRT_LM_HEAD].shape == (128256 // tp, 4096)
    assert all(len([n for n in s if n.endswith("qkv.weight")]) == 16 for s in shards)
    assert {t.dtype for s in shards for t in s.values()} == {torch.float16}


def test_lm_head_padded_with_zero_rows():
    weight = torch.randn(97, 3)
    parts = [pad_and_split_lm_head(weight, 4, r) for r in range(4)]
    assert [p.shape[0] for p in parts] == [25, 25, 25, 25]
    assert torch.equal(torch.cat(parts)[:97], weight) and not torch.cat(parts)[97:].any()


def test_kv_heads_duplicated_onto_consecutive_ranks():
    config = llama3_8b_config(hidden_size=4, num_attention_heads=4, num_key_value_heads=2, head_dim=1)
    q = torch.arange(4.0)[:, None].expand(4, 4)  # row i belongs to head i
    k, v = torch.arange(2.0)[:, None].expand(2, 4) + 10, torch.arange(2.0)[:, None].expand(2, 4) + 20
    fused = [split_qkv(q, k, v, config, 4, r)[:, 0].tolist() for r in range(4)]
    # Query head r sits with the KV head of its group: heads 0,1 -> KV 0; heads 2,3 -> KV 1.
    assert fused == [[0, 10, 20], [1, 10, 20], [2, 11, 21], [3, 11, 21]]


@pytest.mark.parametrize("overrides,tp,pp,message", [
    (dict(num_attention_heads=32, num_key_value_heads=8), 3, 1, "tp=3 must divide the 32 attention heads"),
    (dict(num_attention_heads=24, num_key_value_heads=6), 4, 1, "tp=4 must divide the 6 KV heads"),
    (dict(num_attention_heads=24, num_key_value_heads=2), 3, 1, "tp=3 must be a multiple of the 2 KV heads"),
    (dict(intermediate_size=14338), 4, 1, "tp=4 must divide intermediate_size=14338"),
    (dict(num_hidden_layers=2), 1, 3, "pp=3 exceeds the 2 layers"),
])
def test_impossible_mappings_rejected(overrides, tp, pp, message):
    with pytest.raises(ValueError, match=message):
        validate_mapping(llama3_8b_config(**overrides), Mapping(tp, pp))


def test_convert_rejects_before_writing(hf_models, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="tp=3 must divide the 4 attention heads"):
        convert_checkpoint(hf_models["gqa2-tied-llama3"][0], out, tp_size=3, progress=False)
    assert not out.exists()


def test_reconverting_into_a_dir_replaces_its_shards(hf_models, tmp_path):
    src = hf_models["gqa4-untied"][0]
    convert_checkpoint(src, tmp_path, tp_size=4, progress=False)
    convert_checkpoint(src, tmp_path, tp_size=2, progress=False)
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0.safetensors", "rank1.safetensors"]
    assert TrtllmCheckpoint(tmp_path).mapping == Mapping(tp_size=2)
