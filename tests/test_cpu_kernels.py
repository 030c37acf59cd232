"""The C CPU kernels (paged decode attention, fused norm/RoPE/SiLU) against the torch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmserve.ops import cpu_kernels, fused
from llmserve.ops.attention import CPU_BACKEND, paged_attention, paged_attention_cpu, select_attention
from tests.test_triton_attention import make_batch

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="no C compiler")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("block_size", [1, 8, 16])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_decode_kernel_matches_reference(group, block_size, head_dim):
    contexts = [1, 15, 16, 17, 100, 333, 1025]
    q, k_cache, v_cache, meta = make_batch([(1, c) for c in contexts], num_decodes=len(contexts), group=group,
                                           block_size=block_size, head_dim=head_dim, dtype=torch.float32,
                                           device="cpu")
    scale = head_dim ** -0.5
    out = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
    assert rel_error(out, paged_attention(q, k_cache, v_cache, meta, scale)) < 1e-5


@pytest.mark.parametrize("contexts", [[1], [3], [100], [1025], [2, 700]])
def test_decode_kernel_splits_few_contexts_into_parts_and_merges_them(contexts):
    # fewer sequences than 2x threads: each context is split, empty parts included
    q, k_cache, v_cache, meta = make_batch([(1, c) for c in contexts], num_decodes=len(contexts), group=3,
                                           dtype=torch.float32, device="cpu")
    out = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, 0.125)
    assert rel_error(out, paged_attention(q, k_cache, v_cache, meta, 0.125)) < 1e-5


def test_decode_kernel_reads_q_rows_in_place_from_the_fused_qkv_output():
    q, k_cache, v_cache, meta = make_batch([(1, 40), (1, 9)], num_decodes=2, group=3, dtype=torch.float32,
                                           device="cpu")
    qkv = torch.randn(2, q.shape[1] * q.shape[2] + 64)
    strided = qkv[:, :q.shape[1] * q.shape[2]].view_as(q)
    strided.copy_(q)
    out = cpu_kernels.paged_decode_attention(strided, k_cache, v_cache, meta.block_tables, meta.context_lens, 0.1)
    assert rel_error(out, paged_attention(q, k_cache, v_cache, meta, 0.1)) < 1e-5


def test_mixed_batch_of_decodes_and_prefill_chunks_matches_reference():
    # decodes first, then whole prompts and chunks after a prefix hit, as the runner orders them
    specs = [(1, 50), (1, 300), (1, 7), (37, 37), (16, 80), (1, 1)]
    q, k_cache, v_cache, meta = make_batch(specs, num_decodes=3, dtype=torch.float32, device="cpu")
    out = paged_attention_cpu(q, k_cache, v_cache, meta, 0.125)
    assert rel_error(out, paged_attention(q, k_cache, v_cache, meta, 0.125)) < 1e-5


def test_cpu_float32_models_get_the_c_backend():
    assert select_attention("cpu") is CPU_BACKEND


@pytest.mark.parametrize("shape", [(1, 64), (7, 576), (300, 2048)])
def test_add_rms_norm_matches_torch_and_updates_the_residual_in_place(shape):
    x, residual, w = torch.randn(shape), torch.randn(shape), torch.randn(shape[1])
    expected_sum = x + residual
    out, new_residual = cpu_kernels.add_rms_norm(x, residual, w, 1e-5)
    assert new_residual is residual and torch.allclose(residual, expected_sum)
    assert rel_error(out, fused.rms_norm_torch(expected_sum, w, 1e-5)) < 1e-6
    first_out, stream = cpu_kernels.add_rms_norm(x, None, w, 1e-5)  # layer 0: no residual yet
    assert stream is x and rel_error(first_out, fused.rms_norm_torch(x, w, 1e-5)) < 1e-6


@pytest.mark.parametrize("heads,head_dim", [(9 + 3, 64), (32 + 8, 128)])
@pytest.mark.parametrize("num_tokens", [1, 11, 700])
def test_rope_rotates_q_and_k_heads_in_place_and_leaves_v(heads, head_dim, num_tokens):
    kv_width = 3 * head_dim
    qkv = torch.randn(num_tokens, heads * head_dim + kv_width)
    qk = qkv[:, :heads * head_dim].view(num_tokens, heads, head_dim)
    positions = torch.randint(0, 500, (num_tokens,))
    freqs = torch.outer(torch.arange(512, dtype=torch.float32), torch.rand(head_dim // 2))
    cos, sin = freqs.cos(), freqs.sin()
    ref = fused.rope_torch(qk.clone(), cos[positions], sin[positions])
    v_before = qkv[:, heads * head_dim:].clone()
    cpu_kernels.rope_(qk, positions, cos, sin)
    assert rel_error(qk, ref) < 1e-6
    assert torch.equal(qkv[:, heads * head_dim:], v_before)


@pytest.mark.parametrize("shape", [(1, 2 * 1536), (600, 2 * 1536)])
def test_silu_and_mul_matches_torch(shape):
    gate_up = torch.randn(shape)
    gate, up = gate_up.chunk(2, dim=-1)
    assert rel_error(cpu_kernels.silu_and_mul(gate_up), F.silu(gate) * up) < 1e-6


def test_the_library_is_built_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_kernels.load.cache_clear()
    try:
        assert cpu_kernels.load() is not None
        built = list((tmp_path / "llmserve" / "kernels").glob("cpu_kernels-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        cpu_kernels.load.cache_clear()
        assert cpu_kernels.load() is not None and built[0].stat().st_mtime_ns == stamp
    finally:
        cpu_kernels.load.cache_clear()


def test_without_a_compiler_the_torch_reference_is_used(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    cpu_kernels.load.cache_clear()
    try:
        assert cpu_kernels.load() is None
        assert not cpu_kernels.usable(torch.zeros(1))
        assert select_attention("cpu") is not CPU_BACKEND
    finally:
        cpu_kernels.load.cache_clear()


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("block_size", [1, 16])
def test_prefill_kernel_matches_reference_for_whole_prompts_and_chunks(group, block_size):
    # whole prompts (q_len == ctx), chunks after a prefix hit or an earlier chunk, tile edges
    specs = [(1, 1), (15, 15), (16, 16), (17, 17), (37, 100), (64, 500), (1, 300), (200, 200)]
    q, k_cache, v_cache, meta = make_batch(specs, group=group, block_size=block_size, dtype=torch.float32,
                                           device="cpu")
    out = cpu_kernels.paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                                              meta.context_lens, 0.125)
    assert rel_error(out, paged_attention(q, k_cache, v_cache, meta, 0.125)) < 1e-5


def test_loading_the_kernels_keeps_subnormal_floats_in_the_process():
    # a library linked with -ffast-math turns on flush-to-zero for the whole process when it loads
    import subprocess
    import sys

    script = ("import torch; from llmserve.ops import cpu_kernels; assert cpu_kernels.load() is not None; "
              "print(torch.tensor([1e-40], dtype=torch.float32).mul(1.0).item())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert float(out) > 0.0, "subnormal float32 values were flushed to zero after loading the C kernels"
