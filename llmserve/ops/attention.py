"""Paged attention over a block-structured KV cache: the plain-torch reference.

Legend: T tokens in the flat batch, B sequences, H query heads, Hkv KV heads,
G = H // Hkv, D head dim, N cache blocks, S block size, C context length.
It runs anywhere torch runs; faster kernels (Triton on CUDA) are tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Where each token's K/V goes and what each sequence attends to, for one step.

    Sequences are ordered decodes first (query length 1), then prefill chunks, so the
    decodes can be computed as one batch.
    """

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    context_lens: torch.Tensor  # [B] int32: cached + new tokens of each sequence
    query_start_loc: torch.Tensor  # [B + 1] int32: offsets of each sequence's tokens
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    max_context_len: int
    query_lens_host: list[int]  # host copies, so the reference needs no device sync
    context_lens_host: list[int]


# (q [T, H, D], k_cache, v_cache, meta, scale) -> [T, H, D]
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "AttentionMetadata", float], torch.Tensor]
# (k [T, Hkv, D], v, k_cache, v_cache, slot_mapping) -> None
WriteKVFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True, slots=True)
class AttentionBackend:
    """How a layer stores this step's K/V and attends over the paged cache."""

    write_kv: WriteKVFn
    attend: AttentionFn


def select_attention(device: torch.device | str) -> AttentionBackend:
    """The fastest backend for `device`: Triton kernels on CUDA, the torch reference elsewhere."""
    if torch.device(device).type == "cuda":
        from llmserve.ops.triton_attention import paged_attention_cuda, write_kv_triton

        return AttentionBackend(write_kv_triton, paged_attention_cuda)
    return REFERENCE_BACKEND


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V [T, Hkv, D] into caches [N, S, Hkv, D] at `slot_mapping`."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of q [T, H, D] over each sequence's cached K/V; returns [T, H, D]."""
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta, scale)
    start = nd
    for b in range(nd, len(meta.query_lens_host)):
        q_len, ctx = meta.query_lens_host[b], meta.context_lens_host[b]
        keys, values = _gather_kv(k_cache, v_cache, meta.block_tables[b], ctx)
        out[start:start + q_len] = _prefill_attention(q[start:start + q_len], keys, values, scale)
        start += q_len
    return out


def _gather_kv(k_cache, v_cache, block_table, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_blocks = -(-ctx // k_cache.shape[1])
    blocks = block_table[:num_blocks]
    keys = k_cache[blocks].flatten(0, 1)[:ctx]  # [C, Hkv, D]
    values = v_cache[blocks].flatten(0, 1)[:ctx]
    return keys, values


def _prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    q_len, num_heads, head_dim = q.shape
    ctx, num_kv_heads = keys.shape[0], keys.shape[1]
    group = num_heads // num_kv_heads
    qg = q.view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, q, D]
    k = keys.permute(1, 0, 2).unsqueeze(1)  # [Hkv, 1, C, D]
    v = values.permute(1, 0, 2).unsqueeze(1)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [Hkv, G, q, C]
    # query i sits at position ctx - q_len + i and sees keys 0..that position
    query_pos = torch.arange(ctx - q_len, ctx, device=q.device).unsqueeze(1)
    mask = torch.arange(ctx, device=q.device).unsqueeze(0) > query_pos  # [q, C]
    scores.masked_fill_(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)  # [Hkv, G, q, D]
    return out.permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim)


def _decode_attention(q: torch.Tensor, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    nd, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    max_ctx = max(meta.context_lens_host[:nd])
    num_blocks = -(-max_ctx // block_size)
    tables = meta.block_tables[:nd, :num_blocks]
    keys = k_cache[tables].flatten(1, 2)[:, :max_ctx]  # [B, C, Hkv, D]
    values = v_cache[tables].flatten(1, 2)[:, :max_ctx]
    qg = q.view(nd, num_kv_heads, group, head_dim)  # [B, Hkv, G, D]
    scores = torch.einsum("bhgd,bchd->bhgc", qg, keys).float() * scale  # [B, Hkv, G, C]
    lens = meta.context_lens[:nd].to(torch.long).view(nd, 1, 1, 1)
    mask = torch.arange(max_ctx, device=q.device).view(1, 1, 1, -1) >= lens
    scores.masked_fill_(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.einsum("bhgc,bchd->bhgd", probs, values)  # [B, Hkv, G, D]
    return out.reshape(nd, num_heads, head_dim)


REFERENCE_BACKEND = AttentionBackend(write_kv, paged_attention)
