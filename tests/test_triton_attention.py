"""Triton paged attention vs the torch reference on random paged caches of many shapes.

CUDA cases are `gpu`; a few small cases also run on CPU under the Triton interpreter
(`TRITON_INTERPRET=1` with triton installed), and skip otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from llmserve.ops.attention import AttentionMetadata, paged_attention, write_kv
from llmserve.ops.triton_attention import (PrefillTiles, paged_attention_cuda, paged_decode_attention,
                                           paged_prefill_attention, write_kv_triton)

HAS_CUDA = torch.cuda.is_available()
INTERPRET = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
interpreter = pytest.mark.skipif(not INTERPRET, reason="needs triton and TRITON_INTERPRET=1")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_batch(specs: list[tuple[int, int]], *, num_kv_heads: int = 2, group: int = 4, head_dim: int = 64,
               block_size: int = 16, dtype=torch.bfloat16, device: str = "cuda", num_decodes: int = 0, seed: int = 0):
    """(q, k_cache, v_cache, meta) for sequences given as (q_len, ctx), on shuffled blocks of a random pool.

    The caches are layer 1 of a [L, 2, N, S, Hkv, D] tensor, as the runner hands them out,
    and the pool holds spare random blocks that a wrong table lookup would read.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-ctx // block_size) for _, ctx in specs]
    num_blocks = sum(blocks_per_seq) + 5
    ids = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(specs), max(blocks_per_seq) + 2, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = ids[used:used + n]
        used += n
    kv = torch.randn(2, 2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    q_lens = [q_len for q_len, _ in specs]
    ctxs = [ctx for _, ctx in specs]
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen)
    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64, device=device),
        block_tables=tables.to(device), context_lens=torch.tensor(ctxs, dtype=torch.int32, device=device),
        query_start_loc=query_start_loc.to(device), num_decodes=num_decodes, max_context_len=max(ctxs),
        query_lens_host=q_lens, context_lens_host=ctxs)
    kv = kv.to(device, dtype)
    return q.to(device, dtype), kv[1, 0], kv[1, 1], meta


def reference(q, k_cache, v_cache, meta, scale):
    """The torch reference on float32 copies (tf32 off), as ground truth for every dtype."""
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(out).all(), "some output element was not written (poison survived) or is not finite"
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < TOLERANCE[dtype], f"relative error {err:.2e} over {TOLERANCE[dtype]:.0e} for {dtype}"


def poisoned(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, float("nan"))


def check_decode(contexts, *, num_splits=None, **kw):
    dtype = kw.setdefault("dtype", torch.bfloat16)
    q, k_cache, v_cache, meta = make_batch([(1, c) for c in contexts], num_decodes=len(contexts), **kw)
    scale = q.shape[-1] ** -0.5
    out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale,
                                 out=poisoned(q), num_splits=num_splits)
    assert_close(out, reference(q, k_cache, v_cache, meta, scale), dtype)


def check_prefill(specs, *, tiles=None, **kw):
    dtype = kw.setdefault("dtype", torch.bfloat16)
    q, k_cache, v_cache, meta = make_batch(specs, **kw)
    scale = q.shape[-1] ** -0.5
    out = paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.context_lens,
                                  max(meta.query_lens_host), scale, out=poisoned(q), tiles=tiles)
    assert_close(out, reference(q, k_cache, v_cache, meta, scale), dtype)


DECODE_CONTEXTS = [1, 15, 16, 33, 100, 257, 1000, 2049]
# (q_len, ctx): whole prompts, chunks after a prefix hit (ctx > q_len), a one-token chunk
PREFILL_SPECS = [(1, 1), (37, 37), (200, 200), (16, 80), (64, 500), (1, 300), (129, 1100)]
SHAPES = [(d, s, g) for d in (64, 128) for s in (16, 32) for g in (1, 3, 4, 8)]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("head_dim,block_size,group", SHAPES)
@pytest.mark.parametrize("kernel", ["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_kernel_matches_reference_across_shapes(kernel, dtype, head_dim, block_size, group):
    kw = dict(head_dim=head_dim, block_size=block_size, group=group, dtype=dtype, device="cuda")
    check_decode(DECODE_CONTEXTS, **kw) if kernel == "decode" else check_prefill(PREFILL_SPECS, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("num_splits", [1, 2, 8, 64])
def test_decode_split_counts_agree_with_reference(dtype, num_splits):
    check_decode([1, 5, 64, 700, 4000], num_splits=num_splits, dtype=dtype, head_dim=128, group=4, num_kv_heads=8)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("tiles", [PrefillTiles(128, 64, 8, 2), PrefillTiles(128, 64, 4, 2), PrefillTiles(128, 128, 8, 2),
                                   PrefillTiles(128, 64, 8, 3), PrefillTiles(64, 64, 4, 2), PrefillTiles(64, 32, 4, 3)],
                         ids=str)
@pytest.mark.parametrize("group", [4, 8])
def test_prefill_tile_shapes_agree_with_reference(tiles, group):
    check_prefill(PREFILL_SPECS, tiles=tiles, group=group, num_kv_heads=2, head_dim=128)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_short_chunks_over_long_contexts_match_reference(dtype):
    check_prefill([(16, 2000), (3, 40), (1, 1), (9, 9)], dtype=dtype, group=4, num_kv_heads=8, head_dim=128)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_mixed_batch_dispatch_matches_reference(dtype):
    specs = [(1, 9), (1, 300), (1, 1), (1, 64), (50, 50), (7, 260), (300, 333)]
    q, k_cache, v_cache, meta = make_batch(specs, num_decodes=4, dtype=dtype, head_dim=128, group=4, num_kv_heads=8)
    out = paged_attention_cuda(q, k_cache, v_cache, meta, 0.1, out=poisoned(q))
    assert_close(out, reference(q, k_cache, v_cache, meta, 0.1), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_strided_q_from_fused_qkv_is_read_in_place():
    specs = [(1, 40), (1, 7), (33, 90)]
    q, k_cache, v_cache, meta = make_batch(specs, num_decodes=2, group=4, num_kv_heads=2, head_dim=64)
    qkv = torch.randn(q.shape[0], 12, 64, device="cuda", dtype=q.dtype)  # H + 2 Hkv heads, q first
    qkv[:, :8] = q
    out = paged_attention_cuda(qkv[:, :8], k_cache, v_cache, meta, 0.125)
    assert_close(out, reference(q, k_cache, v_cache, meta, 0.125), q.dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_decode_never_syncs_and_replays_in_a_cuda_graph_with_new_lengths():
    q, k_cache, v_cache, meta = make_batch([(1, 900), (1, 30), (1, 1)], num_decodes=3, num_kv_heads=8, group=4)
    out = torch.empty_like(q)
    run = lambda: paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, 0.1, out=out)  # noqa: E731
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()  # compiles, then launches without reading device values on the host
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    meta.context_lens.copy_(torch.tensor([17, 31, 512], dtype=torch.int32))
    meta.context_lens_host[:] = [17, 31, 512]
    out.fill_(float("nan"))
    graph.replay()
    assert_close(out, reference(q, k_cache, v_cache, meta, 0.1), q.dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("num_splits", [1, 8])
def test_decode_rows_with_empty_context_give_zeros(num_splits):
    # CUDA-graph padding rows carry ctx 0; they must stay finite and not disturb real rows
    q, k_cache, v_cache, meta = make_batch([(1, 20), (1, 1)], num_decodes=2)
    meta.context_lens[1] = 0
    out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, 0.1,
                                 out=poisoned(q), num_splits=num_splits)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    meta.context_lens_host[:], meta.query_lens_host[:] = [20], [1]
    meta.num_decodes = 1
    ref = reference(q[:1], k_cache, v_cache, meta, 0.1)
    assert_close(out[:1], ref, q.dtype)


def check_write_kv(device: str, dtype=torch.bfloat16, num_kv_heads: int = 8, head_dim: int = 128) -> None:
    """write_kv_triton leaves both caches exactly as write_kv does, from strided K/V views."""
    gen = torch.Generator().manual_seed(3)
    kv = torch.randn(2, 2, 9, 16, num_kv_heads, head_dim, generator=gen).to(device, dtype)  # [L, 2, N, S, Hkv, D]
    fused = torch.randn(37, 3, num_kv_heads, head_dim, generator=gen).to(device, dtype)  # q-like, k, v
    slots = torch.randperm(9 * 16, generator=gen)[:37].to(device)
    want = kv.clone()
    write_kv(fused[:, 1], fused[:, 2], want[1, 0], want[1, 1], slots)
    write_kv_triton(fused[:, 1], fused[:, 2], kv[1, 0], kv[1, 1], slots)
    assert torch.equal(kv, want)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("num_kv_heads,head_dim", [(8, 128), (3, 64)])
def test_write_kv_triton_matches_index_copy(num_kv_heads, head_dim):
    check_write_kv("cuda", num_kv_heads=num_kv_heads, head_dim=head_dim)


# ---- the same checks on CPU through the Triton interpreter ------------------------------
# fp16, not bf16: the interpreter's tl.dot treats bf16 operands as raw integers (Triton 3.9)
@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_interpreted_decode_with_splits_matches_reference(dtype):
    check_decode([1, 17, 70, 130], num_splits=4, device="cpu", dtype=dtype, group=3, num_kv_heads=2)


@interpreter
def test_interpreted_decode_without_splits_matches_reference():
    check_decode([3, 50], num_splits=1, device="cpu", dtype=torch.float32, group=1, block_size=32, head_dim=128)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_interpreted_chunked_prefill_matches_reference(dtype):
    check_prefill([(5, 5), (20, 90), (1, 33), (70, 70)], device="cpu", dtype=dtype, group=4, num_kv_heads=2)


@interpreter
def test_interpreted_mixed_batch_dispatch_matches_reference():
    specs = [(1, 20), (1, 3), (9, 40), (33, 33)]
    q, k_cache, v_cache, meta = make_batch(specs, num_decodes=2, device="cpu", dtype=torch.float32, group=8,
                                           num_kv_heads=1, block_size=32)
    out = paged_attention_cuda(q, k_cache, v_cache, meta, 0.2, out=poisoned(q))
    assert_close(out, reference(q, k_cache, v_cache, meta, 0.2), torch.float32)


@interpreter
def test_interpreted_prefill_with_small_tiles_matches_reference():
    check_prefill([(9, 9), (16, 100)], tiles=PrefillTiles(32, 16, 4, 1), device="cpu", dtype=torch.float16, group=3)


@interpreter
def test_interpreted_write_kv_matches_index_copy():
    check_write_kv("cpu", dtype=torch.float16, num_kv_heads=3, head_dim=64)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["decode", "prefill"])
def test_fp8_cache_is_read_as_the_reference_reads_it(kernel):
    # the kernels upcast fp8 K/V to q's dtype; the reference on the same fp8 values dequantized
    specs = [(1, c) for c in DECODE_CONTEXTS] if kernel == "decode" else PREFILL_SPECS
    q, k_cache, v_cache, meta = make_batch(specs, num_decodes=len(specs) if kernel == "decode" else 0)
    k8, v8 = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
    scale = q.shape[-1] ** -0.5
    if kernel == "decode":
        out = paged_decode_attention(q, k8, v8, meta.block_tables, meta.context_lens, scale, out=poisoned(q))
    else:
        out = paged_prefill_attention(q, k8, v8, meta.block_tables, meta.query_start_loc, meta.context_lens,
                                      max(meta.query_lens_host), scale, out=poisoned(q))
    assert_close(out, reference(q, k8.float(), v8.float(), meta, scale), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_write_kv_into_an_fp8_cache_rounds_like_torch():
    k = torch.randn(37, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(37, 8, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(64 * 16, device="cuda")[:37]
    caches = [torch.zeros(64, 16, 8, 128, device="cuda", dtype=torch.float8_e4m3fn) for _ in range(4)]
    write_kv_triton(k, v, caches[0], caches[1], slots)
    write_kv(k, v, caches[2], caches[3], slots)
    for ours, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.allclose(ours.float(), ref.float(), rtol=0.07, atol=1e-3)  # at most one e4m3 step apart
