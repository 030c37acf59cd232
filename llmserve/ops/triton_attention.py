"""Paged attention on CUDA in Triton: split-K decode, ragged chunked prefill, a dispatcher.

Legend: T tokens, B sequences, H query heads, Hkv KV heads, G = H // Hkv (GP: G padded to
a power of two), D head dim, N cache blocks, S block size, P context splits of the decode.
Caches are [N, S, Hkv, D] views with D contiguous; block_tables [B, max_blocks] int32.
Scores live in log2 units (scale * log2 e) so the online softmax uses exp2.
Triton is imported under a guard: on CPU-only installs this module imports, and nothing in it runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from llmserve.ops.attention import AttentionMetadata

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # the kernels stay plain functions that nothing calls
    triton = tl = None

    def _jit(fn=None, **_options):
        return fn if fn is not None else (lambda f: f)

LOG2_E = 1.4426950408889634
# Triton compiles one variant per specialization of its arguments (an int divisible by 16, a pointer
# 16-byte aligned). The block-table width of an eager batch and the slices that start after the decode
# rows change those from step to step, so each new combination compiled inside a user's step (seconds
# on a cold cache, the first minute of a fresh server); these arguments are only read as scalars, so
# they are not specialized and the start-up warm-up covers every variant.
_STEP_VARYING = dict(do_not_specialize=["stride_tb"],
                     do_not_specialize_on_alignment=["table_ptr", "query_start_loc_ptr", "context_lens_ptr"])
MAX_DECODE_SPLITS = 64
MIN_SPLIT_TOKENS = 64  # a split shorter than one tile only adds reduce work


@_jit
def _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table_ptr, start, hi, row_pos, kv_head, qk_scale,
                 stride_kb, stride_ks, stride_kh,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step of q [M, D] over keys start..start+BLOCK_N; returns (acc, m_i, l_i)."""
    keys = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    in_ctx = keys < hi
    if MASKED:
        blocks = tl.load(table_ptr + keys // BLOCK_SIZE, mask=in_ctx, other=0).to(tl.int64)
    else:
        blocks = tl.load(table_ptr + keys // BLOCK_SIZE).to(tl.int64)
    offs = blocks * stride_kb + (keys % BLOCK_SIZE) * stride_ks + kv_head * stride_kh  # [BN]
    if MASKED:
        k = tl.load(k_cache_ptr + offs[None, :] + dims[:, None], mask=in_ctx[None, :], other=0.0)  # [D, BN]
        v = tl.load(v_cache_ptr + offs[:, None] + dims[None, :], mask=in_ctx[:, None], other=0.0)  # [BN, D]
    else:
        k = tl.load(k_cache_ptr + offs[None, :] + dims[:, None])
        v = tl.load(v_cache_ptr + offs[:, None] + dims[None, :])
    k = k.to(q.dtype)  # no-op unless the cache is fp8
    v = v.to(q.dtype)
    s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [M, BN]
    if MASKED:
        visible = in_ctx[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= row_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
    # every row sees a key in its first tile, so m_new is finite and no NaN arises
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@_jit(do_not_specialize=["stride_tb"])
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, context_lens_ptr, out_ptr, part_ptr, qk_scale,
                   stride_qb, stride_qh, stride_ob, stride_oh, stride_tb, stride_kb, stride_ks, stride_kh,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    """Program (seq, kv head, split): all G query heads of one KV head over one slice of the context."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    chunk = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N  # whole tiles, so splits align
    lo = split * chunk
    hi = tl.minimum(lo + chunk, ctx)
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + rows
    row_ok = rows < GROUP
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)  # [GP, D]
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table = table_ptr + seq * stride_tb
    for start in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table, start, hi, rows, kv_head,
                                     qk_scale, stride_kb, stride_ks, stride_kh,
                                     BLOCK_SIZE, BLOCK_N, HEAD_DIM, True, False, PRECISION)
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i == 0 only for a padded ctx == 0 row
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        # partial row [D + 2]: unnormalised acc, then m, then l; empty splits store m = -inf, l = 0
        num_heads = GROUP * tl.num_programs(1)
        part = part_ptr + ((seq * num_heads + heads) * NUM_SPLITS + split) * (HEAD_DIM + 2)  # [GP]
        tl.store(part[:, None] + dims[None, :], acc, mask=row_ok[:, None])
        tl.store(part + HEAD_DIM, m_i, mask=row_ok)
        tl.store(part + HEAD_DIM + 1, l_i, mask=row_ok)


@_jit
def _decode_reduce_kernel(part_ptr, out_ptr, stride_ob, stride_oh,
                          HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Program (seq, head): merge the P partial softmaxes of one query head."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    part = part_ptr + ((seq * tl.num_programs(1) + head) * NUM_SPLITS + splits) * (HEAD_DIM + 2)  # [P]
    m = tl.load(part + HEAD_DIM)
    l_i = tl.load(part + HEAD_DIM + 1)
    acc = tl.load(part[:, None] + dims[None, :])  # [P, D]
    m_max = tl.max(m, 0)
    weight = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
    denom = tl.sum(weight * l_i, 0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


@_jit(**_STEP_VARYING)
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, query_start_loc_ptr, context_lens_ptr, out_ptr,
                    qk_scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_tb, stride_kb, stride_ks, stride_kh,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Program (query tile, seq, kv head): BLOCK_Q tokens x G heads as rows, causal over paged keys."""
    q_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    ctx = tl.load(context_lens_ptr + seq)
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    tok = q_block * BLOCK_Q + rows // GROUP_PAD
    heads = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (tok < q_len) & (rows % GROUP_PAD < GROUP)
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None], other=0.0)  # [BLOCK_Q * GP, D]
    row_pos = ctx - q_len + tok  # padded rows get pos >= ctx and see every key
    first_pos = ctx - q_len + q_block * BLOCK_Q
    hi = tl.minimum(ctx, first_pos + BLOCK_Q)  # one past the last key any row here sees
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # keys below are visible to every row
    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], tl.float32)
    table = table_ptr + seq * stride_tb
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table, start, hi, row_pos,
                                     kv_head, qk_scale, stride_kb, stride_ks, stride_kh,
                                     BLOCK_SIZE, BLOCK_N, HEAD_DIM, False, False, PRECISION)
    for start in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, table, start, hi, row_pos,
                                     kv_head, qk_scale, stride_kb, stride_ks, stride_kh,
                                     BLOCK_SIZE, BLOCK_N, HEAD_DIM, True, True, PRECISION)
    out = acc / l_i[:, None]
    tl.store(out_ptr + (q_start + tok)[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@_jit(do_not_specialize_on_alignment=["slot_mapping_ptr"])
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, stride_kt, stride_kh, stride_vt,
                     stride_vh, stride_cb, stride_cs, stride_ch, NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Program t: token t's K and V [Hkv, D] into both caches at slot_mapping[t]."""
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads < NUM_KV_HEADS)[:, None]
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + heads[:, None] * stride_ch + dims[None, :]
    k = tl.load(k_ptr + t * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)  # rounds into an fp8 cache
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


# ---- launchers ------------------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class PrefillTiles:
    """Prefill tile shape: block_m rows (query tokens x padded G) by block_n keys per step."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_prefill_tiles(dtype: torch.dtype) -> PrefillTiles:
    """Tiles by dtype; 16-bit: the fastest of six on every shape of an H200 sweep (llama-8b heads)."""
    return PrefillTiles(64, 32, 4, 2) if dtype == torch.float32 else PrefillTiles(64, 64, 4, 2)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits still exercise the reduce
    return torch.cuda.get_device_properties(device).multi_processor_count


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs must not round to tf32


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    """(S, Hkv, G) of caches [N, S, Hkv, D] that share one layout with D contiguous."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1, "K/V caches need one layout, D contiguous"
    assert q.shape[-1] == head_dim and q.stride(-1) == 1, "q needs the cache's head dim, contiguous"
    assert q.shape[1] % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    return block_size, num_kv_heads, q.shape[1] // num_kv_heads


def default_num_splits(batch: int, num_kv_heads: int, max_tokens: int, device: torch.device) -> int:
    """Decode splits for a shape alone (no host sync, CUDA-graph safe): ~2 programs per SM."""
    # H200 sweep (llama-8b shapes): batch 1 and 8 were fastest near 2 programs/SM, batch 64 unsplit
    wanted = min(-(-2 * _num_sms(device) // (batch * num_kv_heads)), -(-max_tokens // MIN_SPLIT_TOKENS),
                 MAX_DECODE_SPLITS)
    return 1 if wanted <= 1 else 1 << (wanted - 1).bit_length()  # a power of two for the reduce


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """One query token per sequence: q [B, H, D] over its first context_lens keys; returns [B, H, D]."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads, group = _check_cache(q, k_cache, v_cache)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if batch == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, q.device)
    part = out
    if num_splits > 1:
        part = torch.empty(batch, num_heads, num_splits, head_dim + 2, dtype=torch.float32, device=q.device)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part, scale * LOG2_E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_N=32 if q.dtype == torch.float32 else 64, NUM_SPLITS=num_splits, PRECISION=_precision(q.dtype),
        num_warps=4, num_stages=2)
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](part, out, out.stride(0), out.stride(1),
                                                  HEAD_DIM=head_dim, NUM_SPLITS=num_splits, num_warps=4)
    return out


def compile_decode_variants(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, dtype: torch.dtype) -> int:
    """Run the decode kernel once for every split count it may pick, so none compiles inside a user's step:
    an eager mixed step picks its count from the batch's table width, which the traffic decides. It reads
    block 0 of the cache for one token and writes only its own output; returns the variants run."""
    head_dim, device = k_cache.shape[-1], k_cache.device
    q = torch.zeros(1, num_heads, head_dim, dtype=dtype, device=device)
    table = torch.zeros(1, 1, dtype=torch.int32, device=device)
    context_lens = torch.ones(1, dtype=torch.int32, device=device)
    splits = [1 << i for i in range(MAX_DECODE_SPLITS.bit_length())]
    for num_splits in splits:
        paged_decode_attention(q, k_cache, v_cache, table, context_lens, 1.0, num_splits=num_splits)
    return len(splits)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor, context_lens: torch.Tensor,
                            max_query_len: int, scale: float, out: torch.Tensor | None = None,
                            tiles: PrefillTiles | None = None) -> torch.Tensor:
    """Ragged causal queries: rows query_start_loc[b]..[b+1] of q [T, H, D] sit at the end of ctx b.

    Only rows covered by query_start_loc are written; out [T, H, D] is returned.
    """
    num_seqs = query_start_loc.numel() - 1
    block_size, num_kv_heads, group = _check_cache(q, k_cache, v_cache)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if num_seqs <= 0 or max_query_len <= 0:
        return out
    group_pad = triton.next_power_of_2(group)
    tiles = tiles or default_prefill_tiles(q.dtype)
    block_q = max(1, tiles.block_m // group_pad)
    _prefill_kernel[(triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)](
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out, scale * LOG2_E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, HEAD_DIM=q.shape[2], BLOCK_SIZE=block_size,
        BLOCK_N=tiles.block_n, PRECISION=_precision(q.dtype), num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out


def paged_attention_cuda(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         meta: AttentionMetadata, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `attention.paged_attention`: decode kernel on the first num_decodes rows, prefill on the rest."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    nd = meta.num_decodes
    if nd:
        paged_decode_attention(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.context_lens[:nd], scale,
                               out=out[:nd])
    if len(meta.query_lens_host) > nd:
        # decodes own one row each, so query_start_loc[nd:] still indexes rows of the full q
        paged_prefill_attention(q, k_cache, v_cache, meta.block_tables[nd:], meta.query_start_loc[nd:],
                                meta.context_lens[nd:], max(meta.query_lens_host[nd:]), scale, out=out)
    return out


def write_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Like `attention.write_kv` in one launch: K/V [T, Hkv, D] (strided views fine) into caches at slot_mapping."""
    num_tokens, num_kv_heads, head_dim = k.shape
    assert k_cache.stride() == v_cache.stride() and k.stride(2) == 1 and v.stride(2) == 1, "D must be contiguous"
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1], num_warps=4)
