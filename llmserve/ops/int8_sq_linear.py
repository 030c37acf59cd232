"""INT8 W8A8 linears as SmoothQuant checkpoints store them (TensorRT-LLM `W8A8_SQ_PER_CHANNEL`).

The weight is int8 with one scale per output channel (W ~ W_int8 * s_w[:, None]); the input is first
multiplied by the smoothing factors `prequant_scale` (one per input channel), then quantized to int8
with one calibrated per-tensor scale s_x; y = (x_int8 W_int8^T) * s_x * s_w, the product exact in
int32 (`torch._int_mm`, CPU and CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.ops.triton_support import jit as _jit, tl, triton  # noqa: F401

INT8_MAX = 127.0


def quantize_int8(tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(tensor / scale) clamped to [-127, 127], int8 (`scale` broadcasts)."""
    return (tensor.float() / scale.to(tensor.device)).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def smooth_quantize_input(x: torch.Tensor, prequant_scale: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """int8 of (x * prequant_scale) / input_scale for x [M, K]; one Triton kernel on CUDA."""
    if x.is_cuda and triton is not None and x.is_contiguous():
        out = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        n, block = x.numel(), 1024
        _smooth_quantize_kernel[(triton.cdiv(n, block),)](x, prequant_scale, input_scale, out, n, x.shape[-1],
                                                          BLOCK=block)
        return out
    return quantize_int8(x.float() * prequant_scale, input_scale)


@_jit
def _smooth_quantize_kernel(x_ptr, prequant_ptr, scale_ptr, out_ptr, n, K, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    x = x * tl.load(prequant_ptr + offsets % K, mask=mask, other=0.0)
    y = tl.clamp(x / tl.load(scale_ptr), -127.0, 127.0)
    rounded = tl.floor(y + 0.5)  # to nearest, ties to even (as torch.round)
    tie_to_odd = ((rounded - y) == 0.5) & ((rounded - 2.0 * tl.floor(rounded * 0.5)) != 0.0)
    y = tl.where(tie_to_odd, rounded - 1.0, rounded)
    tl.store(out_ptr + offsets, y.to(tl.int8), mask=mask)


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b [K, N] int8 -> int32, exact; CUDA's kernel wants more than 16 rows."""
    rows = a.shape[0]
    if a.is_cuda and rows <= 16:
        a = F.pad(a, (0, 0, 0, 17 - rows))
    return torch._int_mm(a, b)[:rows]


class Int8SqLinear(nn.Module):
    """y = x W^T (no bias) with per-channel int8 weights, a smoothed per-tensor int8 input."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.register_buffer("prequant_scale", torch.ones(in_features, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_int8 = smooth_quantize_input(x.reshape(-1, shape[-1]), self.prequant_scale, self.input_scale)
        acc = _int_mm(x_int8, self.weight.t())
        y = acc.float() * (self.input_scale * self.weight_scale)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 W8A8 smoothed"
