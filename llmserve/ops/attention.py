"""Paged attention over a block-structured KV cache: the plain-torch reference.

Legend: T tokens in the flat batch, B sequences, H query heads, Hkv KV heads,
G = H // Hkv, D head dim, N cache blocks, S block size, C context length.
It runs anywhere torch runs; faster kernels (Triton on CUDA) are tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

HALF_DTYPES = (torch.float16, torch.bfloat16)


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
    """The fastest backend for `device`: Triton kernels on CUDA, the C kernels on CPU when
    a C compiler is there, else the torch reference."""
    if torch.device(device).type == "cuda":
        from llmserve.ops.triton_attention import paged_attention_cuda, write_kv_triton

        return AttentionBackend(write_kv_triton, paged_attention_cuda)
    from llmserve.ops import cpu_kernels

    return CPU_BACKEND if cpu_kernels.load() is not None else REFERENCE_BACKEND


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V [T, Hkv, D] into caches [N, S, Hkv, D] at `slot_mapping`."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    for new, cache in ((k, k_cache), (v, v_cache)):
        new = new.to(cache.dtype)  # an fp8 cache rounds here; torch has no fp8 index_copy_: copy bytes
        _as_bytes(cache).view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, _as_bytes(new))


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of q [T, H, D] over each sequence's cached K/V; returns [T, H, D].

    One gather and two bmm per sequence: plain and obviously right, the ground truth
    the C and Triton kernels are tested against.
    """
    out = torch.empty_like(q)
    start = 0
    for b, (q_len, ctx) in enumerate(zip(meta.query_lens_host, meta.context_lens_host)):
        keys, values = _gather_kv(k_cache, v_cache, meta.block_tables[b], ctx)
        keys, values = keys.to(q.dtype), values.to(q.dtype)  # an fp8 cache is read back as q's dtype
        out[start:start + q_len] = _attend(q[start:start + q_len], keys, values, scale)
        start += q_len
    return out


def paged_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The C kernels (float32): one call for the decodes, one for the prefill chunks."""
    from llmserve.ops import cpu_kernels

    if q.dtype != torch.float32:
        return paged_attention(q, k_cache, v_cache, meta, scale)
    num_decodes, num_seqs = meta.num_decodes, len(meta.query_lens_host)
    parts = []
    if num_decodes:  # decodes come first, one token each
        parts.append(cpu_kernels.paged_decode_attention(
            q[:num_decodes], k_cache, v_cache, meta.block_tables[:num_decodes], meta.context_lens[:num_decodes],
            scale))  # [B_decode, H, D]
    if num_decodes < num_seqs:
        parts.append(cpu_kernels.paged_prefill_attention(
            q[num_decodes:], k_cache, v_cache, meta.block_tables[num_decodes:],
            meta.query_start_loc[num_decodes:] - num_decodes, meta.context_lens[num_decodes:], scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _gather_kv(k_cache, v_cache, block_table, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first `ctx` keys and values as [Hkv, C, D] views of gathered blocks."""
    num_blocks = -(-ctx // k_cache.shape[1])
    blocks = block_table[:num_blocks].long()
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    keys = _as_bytes(k_cache).index_select(0, blocks).view(k_cache.dtype).view(-1, num_kv_heads, head_dim)[:ctx]
    values = _as_bytes(v_cache).index_select(0, blocks).view(v_cache.dtype).view(-1, num_kv_heads, head_dim)[:ctx]
    # keys, values: [C, Hkv, D]
    return keys.transpose(0, 1), values.transpose(0, 1)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """q [q, H, D] at the last q of ctx positions, over keys/values [Hkv, C, D]; returns [q, H, D].

    Float32: two bmm calls per sequence, which on CPU measured 4x (decode) to 15x (prefill)
    faster than SDPA with enable_gqa. Half precision: SDPA (see `_attend_sdpa`).
    """
    if q.dtype in HALF_DTYPES:
        return _attend_sdpa(q, keys, values, scale)
    q_len, num_heads, head_dim = q.shape
    num_kv_heads, ctx = keys.shape[0], keys.shape[1]
    group = num_heads // num_kv_heads
    qg = q.view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, q, D]
    qg = qg.reshape(num_kv_heads, group * q_len, head_dim)
    scores = torch.bmm(qg, keys.transpose(1, 2)).float() * scale  # [Hkv, G*q, C]
    if q_len > 1:  # query i sits at position ctx - q_len + i and sees keys 0..that position
        scores = scores.view(num_kv_heads, group, q_len, ctx)
        query_pos = torch.arange(ctx - q_len, ctx, device=q.device).unsqueeze(1)
        hidden = torch.arange(ctx, device=q.device).unsqueeze(0) > query_pos  # [q, C]
        scores = scores.masked_fill(hidden, float("-inf")).view(num_kv_heads, group * q_len, ctx)
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.bmm(probs, values)  # [Hkv, G*q, D]
    return out.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim)


def _attend_sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """`_attend` for float16/bfloat16 through SDPA, the kernel HF transformers runs.

    SDPA keeps q.k in float32 through the softmax, where a half-precision bmm rounds each
    score to the half type (bf16 keeps 8 bits); and being HF's kernel, with RoPE rounded as
    HF rounds it (`fused.rope_torch`), a request computed alone gets HF's logits bit for bit.
    On CPU it also measured faster than the bf16 bmm pair (SmolLM2, 16 sequences: 164 vs 119 tok/s).
    """
    q_len, ctx = q.shape[0], keys.shape[1]
    mask = None
    if 1 < q_len < ctx:  # a chunk after cached tokens: query i sits at position ctx - q_len + i
        mask = torch.arange(ctx, device=q.device) <= torch.arange(ctx - q_len, ctx, device=q.device).unsqueeze(1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask,
        is_causal=1 < q_len == ctx, scale=scale, enable_gqa=True)  # [1, H, q, D]
    return out[0].transpose(0, 1)  # [q, H, D]


REFERENCE_BACKEND = AttentionBackend(write_kv, paged_attention)
CPU_BACKEND = AttentionBackend(write_kv, paged_attention_cpu)
