"""The one declarative weight-name map: HuggingFace LLaMA <-> TensorRT-LLM checkpoint.

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
    get: Callable[[str], torch.Tensor], num_layers: int, tie_word_embeddings: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tp=1, pp=1 TensorRT-LLM tensors of an HF LLaMA, one at a time."""
    yield TRT_EMBEDDING, get(HF_EMBEDDING)
    for i in range(num_layers):
        for hf_suffix, (trt_suffix, _) in LAYER_WEIGHTS.items():
            yield trt_layer(i, trt_suffix), get(hf_layer(i, hf_suffix))
        yield trt_layer(i, QKV_TRT), torch.cat([get(hf_layer(i, s)) for s in QKV_HF], dim=0)
    yield TRT_FINAL_NORM, get(HF_FINAL_NORM)
    yield TRT_LM_HEAD, get(HF_EMBEDDING if tie_word_embeddings else HF_LM_HEAD)
