"""The one declarative weight-name map: HuggingFace LLaMA family <-> TensorRT-LLM checkpoint.

The converter uses it to write rank shards; the native loader uses it to read HF
checkpoints (through a tp=1 conversion), so both runtimes see the same tensors.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, Iterator

import torch


class Split(Enum):
    """How a tensor is divided across tensor-parallel ranks."""

    REPLICATED = "replicated"
    COLUMN = "column"  # split the output dim (dim 0 of an (out, in) weight)
    ROW = "row"  # split the input dim (dim 1)


# Per-layer weights: HF suffix -> (TRT-LLM suffix, split). q/k/v are fused separately.
LAYER_WEIGHTS: dict[str, tuple[str, Split]] = {
    "input_layernorm.weight": ("input_layernorm.weight", Split.REPLICATED),
    "post_attention_layernorm.weight": ("post_layernorm.weight", Split.REPLICATED),
    "self_attn.o_proj.weight": ("attention.dense.weight", Split.ROW),
    "mlp.gate_proj.weight": ("mlp.fc.weight", Split.COLUMN),  # the activated branch
    "mlp.up_proj.weight": ("mlp.gate.weight", Split.COLUMN),
    "mlp.down_proj.weight": ("mlp.proj.weight", Split.ROW),
}
QKV_HF = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
QKV_TRT = "attention.qkv.weight"
# Qwen2's q/k/v biases, fused and split across ranks exactly like the weight's rows.
QKV_BIAS_HF = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
QKV_BIAS_TRT = "attention.qkv.bias"
# A buffer older transformers versions saved beside the weights: recomputed from the config, so skipped.
IGNORED_HF_LAYER_SUFFIXES = ("self_attn.rotary_emb.inv_freq",)

HF_EMBEDDING = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"
TRT_EMBEDDING = "transformer.vocab_embedding.weight"
TRT_FINAL_NORM = "transformer.ln_f.weight"
TRT_LM_HEAD = "lm_head.weight"


def hf_layer(i: int, suffix: str) -> str:
    return f"model.layers.{i}.{suffix}"


def trt_layer(i: int, suffix: str) -> str:
    return f"transformer.layers.{i}.{suffix}"


def hf_to_trtllm_single_rank(
    get: Callable[[str], torch.Tensor], num_layers: int, tie_word_embeddings: bool, attn_bias: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tp=1, pp=1 TensorRT-LLM tensors of an HF LLaMA-family model, one at a time."""
    yield TRT_EMBEDDING, get(HF_EMBEDDING)
    for i in range(num_layers):
        for hf_suffix, (trt_suffix, _) in LAYER_WEIGHTS.items():
            yield trt_layer(i, trt_suffix), get(hf_layer(i, hf_suffix))
        yield trt_layer(i, QKV_TRT), torch.cat([get(hf_layer(i, s)) for s in QKV_HF], dim=0)
        if attn_bias:
            yield trt_layer(i, QKV_BIAS_TRT), torch.cat([get(hf_layer(i, s)) for s in QKV_BIAS_HF], dim=0)
    yield TRT_FINAL_NORM, get(HF_FINAL_NORM)
    yield TRT_LM_HEAD, get(HF_EMBEDDING if tie_word_embeddings else HF_LM_HEAD)


def hf_layer_suffixes(attn_bias: bool) -> list[str]:
    """The HF per-layer tensor suffixes the map reads."""
    return [*LAYER_WEIGHTS, *QKV_HF, *(QKV_BIAS_HF if attn_bias else ())]


# Quantized checkpoints: these linears' weights are quantized, each followed by its scale tensors
QUANTIZED_LINEARS = ("attention.dense", "mlp.fc", "mlp.gate", "mlp.proj", "attention.qkv")
WEIGHT_SCALE = "weights_scaling_factor"  # dequantizes the weight: per tensor (FP8), output channel (SQ), group (AWQ)
INPUT_SCALE = "activation_scaling_factor"  # quantizes the input, per tensor
PREQUANT_SCALE = "prequant_scaling_factor"  # SmoothQuant, AWQ: multiplies the input first, per input channel
# the linears whose input dimension is split across tensor ranks (the others split their output rows)
ROW_PARALLEL_LINEARS = frozenset(trt.removesuffix(".weight") for trt, split in LAYER_WEIGHTS.values()
                                 if split is Split.ROW)
QUANT_SCALES = {"FP8": (WEIGHT_SCALE, INPUT_SCALE),
                "W8A8_SQ_PER_CHANNEL": (WEIGHT_SCALE, INPUT_SCALE, PREQUANT_SCALE),
                "W8A16": (),  # model-dtype weights, quantized when loaded or built (see quantization/weight_only.py)
                "W4A16_AWQ": (WEIGHT_SCALE, PREQUANT_SCALE)}
PACKED_INT4_ALGOS = frozenset({"W4A16_AWQ"})  # weights hold two int4 per int8 along the output dim


def quant_scale_suffixes(linear: str, quant_algo: str | None) -> tuple[str, ...]:
    """The scale tensor suffixes of one quantized linear (e.g. `attention.qkv`), in the converter's order."""
    if linear not in QUANTIZED_LINEARS:
        return ()
    return tuple(f"{linear}.{scale}" for scale in QUANT_SCALES.get(quant_algo, ()))


def trt_layer_suffixes(attn_bias: bool, quant_algo: str | None = None) -> list[str]:
    """The TensorRT-LLM per-layer tensor suffixes of one rank, in the order the converter writes them."""
    suffixes = []
    for trt, _ in [*LAYER_WEIGHTS.values(), (QKV_TRT, None)]:
        suffixes += [trt, *quant_scale_suffixes(trt.removesuffix(".weight"), quant_algo)]
    return suffixes + ([QKV_BIAS_TRT] if attn_bias else [])


def hf_tensor_names(num_layers: int, tie_word_embeddings: bool, attn_bias: bool) -> set[str]:
    """Every HF tensor name the map reads for a model of this shape."""
    wanted = {HF_EMBEDDING, HF_FINAL_NORM, *(() if tie_word_embeddings else (HF_LM_HEAD,))}
    suffixes = hf_layer_suffixes(attn_bias)
    return wanted | {hf_layer(i, suffix) for i in range(num_layers) for suffix in suffixes}


def is_ignored_hf_tensor(name: str, tie_word_embeddings: bool) -> bool:
    """Tensors an HF checkpoint may hold that the model rightly does not read."""
    if tie_word_embeddings and name == HF_LM_HEAD:
        return True  # a tied model may still save its lm_head: the same matrix as the embedding
    return name.startswith("model.layers.") and name.endswith(IGNORED_HF_LAYER_SUFFIXES)
