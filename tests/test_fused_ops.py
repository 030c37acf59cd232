"""Fused Triton elementwise kernels against their torch twins (CUDA, or the Triton interpreter)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from llmserve.ops import fused
from llmserve.ops.exponential_noise import exponential_noise_torch, exponential_noise_triton

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and fused.triton is not None
DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu)] if CUDA else []
DEVICES += [pytest.param("cpu", id="interpreter")] if INTERPRET else []
pytestmark = pytest.mark.skipif(not DEVICES, reason="needs CUDA or TRITON_INTERPRET=1 with triton")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])  # interpreter: no bf16 dots


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def tol(dtype) -> float:
    return {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


@pytest.mark.parametrize("device", DEVICES or ["cpu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 576), (33, 4096)])
def test_rms_norm_matches_torch(device, dtype, shape):
    x = torch.randn(shape, device=device, dtype=dtype)
    w = torch.randn(shape[1], device=device, dtype=dtype)
    out = fused.rms_norm_triton(x, w, 1e-5)
    assert rel_error(out, fused.rms_norm_torch(x, w, 1e-5)) < tol(dtype)


@pytest.mark.parametrize("device", DEVICES or ["cpu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 576), (33, 4096)])
def test_add_rms_norm_matches_torch_and_writes_the_sum_in_place(device, dtype, shape):
    x = torch.randn(shape, device=device, dtype=dtype)
    residual = torch.randn(shape, device=device, dtype=dtype)
    w = torch.randn(shape[1], device=device, dtype=dtype)
    ref_out, ref_sum = fused.add_rms_norm_torch(x, residual.clone(), w, 1e-5)
    out, new_residual = fused.add_rms_norm_triton(x, residual, w, 1e-5)
    assert new_residual is residual and torch.equal(residual, ref_sum), "the sum is rounded as the unfused add"
    assert rel_error(out, ref_out) < tol(dtype)


@pytest.mark.parametrize("device", DEVICES or ["cpu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,head_dim", [(9, 64), (32, 128), (3, 64)])
def test_rope_in_place_on_a_strided_view_matches_torch(device, dtype, heads, head_dim):
    num_tokens, kv = 11, 2
    qkv = torch.randn(num_tokens, (heads + 2 * kv) * head_dim, device=device, dtype=dtype)
    q = qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)  # strided like the model's split
    positions = torch.randint(0, 500, (num_tokens,), device=device)
    freqs = torch.outer(torch.arange(512, dtype=torch.float32), torch.rand(head_dim // 2) * 0.5).to(device)
    cos, sin = freqs.cos(), freqs.sin()
    ref = fused.rope_torch(q.clone(), cos[positions], sin[positions])
    untouched = qkv[:, heads * head_dim:].clone()
    fused.rope_triton_(q, positions, cos, sin)
    assert rel_error(q, ref) < tol(dtype)
    assert torch.equal(qkv[:, heads * head_dim:], untouched), "k/v columns must not change"


@pytest.mark.parametrize("device", DEVICES or ["cpu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 1536), (5, 2 * 14336)])
def test_silu_and_mul_matches_torch(device, dtype, shape):
    gate_up = torch.randn(shape, device=device, dtype=dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    out = fused.silu_and_mul_triton(gate_up)
    assert rel_error(out, F.silu(gate.float()) * up.float()) < tol(dtype) * 2


@pytest.mark.parametrize("device", DEVICES or ["cpu"])
@pytest.mark.parametrize("vocab", [1, 1000, 49152])
def test_exponential_noise_matches_torch(device, vocab):
    keys = torch.tensor([0, -1, 3, 2**62 + 12345, -(2**63)], device=device)
    out = exponential_noise_triton(keys, vocab)
    ref = exponential_noise_torch(keys, vocab)  # same integer hash; only log's last bit may differ
    assert out.shape == (5, vocab) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
