"""A plain pure-torch LLaMA forward over TensorRT-LLM rank shards, simulating TP and PP on one CPU.

It verifies converted checkpoints and is independent of the native runtime: no KV cache,
the full sequence at once, float32. Column-parallel outputs stay per rank (heads, MLP
columns), row-parallel partial sums are added (the all-reduce), pipeline stages run in order.
Weight names are spelled out from the TensorRT-LLM format rather than taken from `names.py`,
so a mistake in the shared map shows up as a mismatch with HuggingFace.

Shapes: T tokens, E hidden size, H query heads and Hkv KV heads on one rank, D head dim,
F intermediate columns on one rank, V vocabulary size.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from llmserve.checkpoint.convert import Mapping, heads_per_rank
from llmserve.checkpoint.model_config import ModelConfig
from llmserve.checkpoint.trtllm_format import TrtllmCheckpoint

Shard = dict[str, torch.Tensor]


def reference_forward(checkpoint: TrtllmCheckpoint, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Float32 logits [T, V] of `token_ids` computed from `checkpoint`'s rank shards as stored."""
    shards = [checkpoint.rank_tensors(rank) for rank in range(checkpoint.mapping.world_size)]
    return reference_forward_shards(checkpoint.config, checkpoint.mapping, shards, token_ids)


def reference_forward_shards(config: ModelConfig, mapping: Mapping, shards: Sequence[Shard],
                             token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Float32 logits [T, V]; `shards[rank]` holds rank `rank`'s tensors (local layer numbering)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)  # [T]
    cos, sin = rope_tables(config, len(ids))  # [T, D] each
    for pp_rank in range(mapping.pp_size):
        stage = [shards[mapping.rank(tp_rank, pp_rank)] for tp_rank in range(mapping.tp_size)]
        if pp_rank == 0:
            x = _w(stage[0], "transformer.vocab_embedding.weight")[ids]  # [T, E]
        for local in range(len(mapping.pp_layers(pp_rank, config.num_hidden_layers))):
            x = decoder_layer(x, [_layer(shard, local) for shard in stage], config, cos, sin)
        # Here stage pp_rank would send x [T, E] to stage pp_rank + 1.
    normed = [rms_norm(x, _w(shard, "transformer.ln_f.weight"), config.rms_norm_eps) for shard in stage]
    logits = [h @ _w(shard, "lm_head.weight").T for h, shard in zip(normed, stage)]  # tp x [T, V/tp]
    return torch.cat(logits, dim=-1)[:, : config.vocab_size]  # [T, V], padding rows dropped


def decoder_layer(x: torch.Tensor, ranks: list[Shard], config: ModelConfig, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
    """One pre-norm layer; `ranks` holds each TP rank's weights of this layer."""
    q_heads, kv_heads = heads_per_rank(config, len(ranks))
    eps = config.rms_norm_eps
    # Every rank normalises with its own replicated norm weight; the sums are the all-reduces.
    x = x + sum(attention(rms_norm(x, w["input_layernorm.weight"], eps), w, q_heads, kv_heads, cos, sin)
                for w in ranks)
    return x + sum(mlp(rms_norm(x, w["post_layernorm.weight"], eps), w) for w in ranks)


def attention(h: torch.Tensor, w: Shard, q_heads: int, kv_heads: int, cos: torch.Tensor,
              sin: torch.Tensor) -> torch.Tensor:
    """One rank's causal GQA over its heads; returns its partial sum [T, E] of `attention.dense`."""
    num_tokens, head_dim = h.shape[0], cos.shape[-1]
    qkv = h @ w["attention.qkv.weight"].T  # [T, (H + 2 Hkv) D]
    if "attention.qkv.bias" in w:  # Qwen2; the checkpoint reader checked it matches the config
        qkv = qkv + w["attention.qkv.bias"]
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = apply_rope(q.view(num_tokens, q_heads, head_dim).transpose(0, 1), cos, sin)  # [H, T, D]
    k = apply_rope(k.view(num_tokens, kv_heads, head_dim).transpose(0, 1), cos, sin)  # [Hkv, T, D]
    v = v.view(num_tokens, kv_heads, head_dim).transpose(0, 1)  # [Hkv, T, D]
    # Consecutive query heads share a KV head, also when the KV head was duplicated onto this rank.
    k, v = (t.repeat_interleave(q_heads // kv_heads, dim=0) for t in (k, v))  # [H, T, D]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [H, T, D]
    return out.transpose(0, 1).reshape(num_tokens, q_heads * head_dim) @ w["attention.dense.weight"].T


def mlp(h: torch.Tensor, w: Shard) -> torch.Tensor:
    """One rank's SwiGLU columns; returns its partial sum [T, E] of `mlp.proj`."""
    act = F.silu(h @ w["mlp.fc.weight"].T) * (h @ w["mlp.gate.weight"].T)  # [T, F]
    return act @ w["mlp.proj.weight"].T


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_tables(config: ModelConfig, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, D] for positions 0..T-1, GPT-NeoX layout (two halves)."""
    positions = torch.arange(num_tokens, dtype=torch.float32)
    freqs = torch.outer(positions, inv_frequencies(config))  # [T, D/2]
    angles = torch.cat([freqs, freqs], dim=-1)  # [T, D]
    return angles.cos(), angles.sin()


def inv_frequencies(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies [D/2], with 'linear' or 'llama3' scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_frequencies(inv_freq, scaling)
    raise NotImplementedError(f"rope scaling {rope_type!r} is not supported by the reference forward")


def _llama3_inv_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelengths_per_context = scaling["original_max_position_embeddings"] * inv_freq / (2 * math.pi)
    smooth = ((wavelengths_per_context - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [heads, T, D] by position, rotating the first half of D against the second."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def _layer(shard: Shard, local: int) -> Shard:
    """This rank's float32 weights of its local layer `local`, keyed by TensorRT-LLM suffix."""
    prefix = f"transformer.layers.{local}."
    return {name[len(prefix):]: t.float() for name, t in shard.items() if name.startswith(prefix)}


def _w(shard: Shard, name: str) -> torch.Tensor:
    return shard[name].float()
