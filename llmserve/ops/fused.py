"""Fused elementwise kernels (RMSNorm with the residual add, RoPE, SiLU-and-mul) with torch twins.

A decode step is hundreds of tiny elementwise ops; each of these replaces 3-20 of them
with one: Triton on CUDA, C on CPU (float32, `cpu_kernels`), the torch twin elsewhere.
The Triton and C versions are tested against the twins.
Legend: T tokens, E hidden size, H heads, D head dim, I intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmserve.ops import cpu_kernels

from llmserve.ops.triton_support import jit as _jit, tl, triton  # noqa: F401

def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and triton is not None


# ---- RMSNorm ------------------------------------------------------------------------------
def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@_jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, eps, E: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < E
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / E + eps)
    w = tl.load(w_ptr + cols, mask=mask)
    y = (x * inv).to(w.dtype) * w  # cast before the weight, as HF does
    tl.store(out_ptr + row * stride_o + cols, y, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [T, E]."""
    if cpu_kernels.usable(x) and x.dim() == 2 and weight.dtype == torch.float32:
        return cpu_kernels.add_rms_norm(x, None, weight, eps)[0]
    if not _use_triton(x) or x.dim() != 2 or x.stride(1) != 1:
        return rms_norm_torch(x, weight, eps)
    return rms_norm_triton(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm step of a decoder layer: residual = x + residual (x alone when None),
    returns (rms_norm(residual), residual). Fused (C, Triton): one pass, the sum written
    into `residual` in place."""
    if cpu_kernels.usable(x) and x.dim() == 2 and weight.dtype == torch.float32:
        return cpu_kernels.add_rms_norm(x, residual, weight, eps)
    if (residual is not None and _use_triton(x) and x.dim() == 2 and x.stride(1) == 1
            and residual.stride(1) == 1 and residual.dtype == x.dtype):
        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_torch(x, residual, weight, eps)


def add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x if residual is None else x + residual  # in the model dtype, as HF adds
    return rms_norm(residual, weight, eps), residual


@_jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, eps,
                         E: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < E
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
    total = x + r  # rounded to the storage dtype, as the unfused add would be
    tl.store(res_ptr + row * stride_r + cols, total, mask=mask)
    h = total.to(tl.float32)
    inv = tl.rsqrt(tl.sum(h * h, axis=0) / E + eps)
    w = tl.load(w_ptr + cols, mask=mask)
    tl.store(out_ptr + row * stride_o + cols, (h * inv).to(w.dtype) * w, mask=mask)


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = triton.next_power_of_2(x.shape[1])
    if x.shape[0]:
        _add_rms_norm_kernel[(x.shape[0],)](x, residual, weight, out, x.stride(0), residual.stride(0), out.stride(0),
                                            eps, E=x.shape[1], BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return out, residual


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = triton.next_power_of_2(x.shape[1])
    _rms_norm_kernel[(x.shape[0],)](x, weight, out, x.stride(0), out.stride(0), eps, E=x.shape[1], BLOCK=block,
                                    num_warps=8 if block >= 4096 else 4)
    return out


# ---- RoPE (GPT-NeoX halves) -------------------------------------------------------------------
def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by per-token cos/sin [T, D/2]; returns a new tensor.

    Computed in x's dtype with cos/sin rounded to it, as HF transformers rotates, so that
    half-precision models match HF bit for bit (a float32 rotation rounded once differs from
    HF's in about a third of the bf16 attention outputs, enough to change greedy tokens).
    """
    cos, sin = cos.to(x.dtype).unsqueeze(1), sin.to(x.dtype).unsqueeze(1)  # [T, 1, D/2]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@_jit(do_not_specialize_on_alignment=["pos_ptr"])  # positions may be a slice: no variant per offset
def _rope_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, stride_t, stride_h, num_heads,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0)
    pos = tl.load(pos_ptr + token)
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    mask = heads < num_heads
    cos = tl.load(cos_ptr + pos * HALF + cols)
    sin = tl.load(sin_ptr + pos * HALF + cols)
    base = x_ptr + token * stride_t + heads * stride_h + cols
    x1 = tl.load(base, mask=mask).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask).to(tl.float32)
    tl.store(base, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


def rope_(x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] in place at `positions` (tables [P, D/2] float32); returns x."""
    if cpu_kernels.usable(x) and x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        return cpu_kernels.rope_(x, positions, cos_table, sin_table)
    if not _use_triton(x) or x.stride(2) != 1:
        x.copy_(rope_torch(x, cos_table[positions], sin_table[positions]))
        return x
    return rope_triton_(x, positions, cos_table, sin_table)


def rope_triton_(x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor):
    num_tokens, num_heads, head_dim = x.shape
    if num_tokens:
        _rope_kernel[(num_tokens,)](x, positions, cos_table, sin_table, x.stride(0), x.stride(1), num_heads,
                                    HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(num_heads), num_warps=4)
    return x


# ---- SwiGLU activation ---------------------------------------------------------------------------
@_jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, I: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] holding gate then up -> silu(gate) * up [T, I]."""
    if cpu_kernels.usable(gate_up) and gate_up.dim() == 2:
        return cpu_kernels.silu_and_mul(gate_up)
    if not _use_triton(gate_up) or gate_up.stride(1) != 1:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    return silu_and_mul_triton(gate_up)


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    num_tokens, width = gate_up.shape
    size = width // 2
    out = torch.empty(num_tokens, size, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if num_tokens:
        _silu_mul_kernel[(num_tokens, triton.cdiv(size, block))](gate_up, out, gate_up.stride(0), out.stride(0),
                                                                 I=size, BLOCK=block, num_warps=4)
    return out
