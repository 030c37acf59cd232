"""FP8 linear layers with per-tensor scales, as TensorRT-LLM's FP8 checkpoints store them.

A weight W is kept as float8_e4m3fn with one float32 scale s_w (W ~ W_fp8 * s_w, s_w = amax|W| / 448);
the layer's input x is quantized with a calibrated scale s_x (x_fp8 = clamp(x / s_x)), and
y = (x_fp8 W_fp8^T) * s_x * s_w. On CUDA with FP8 tensor cores (compute capability 8.9+) that is
one `torch._scaled_mm`; elsewhere the same quantized values are dequantized and multiplied in the
input's dtype, so CPU runs show the accuracy of FP8 (not its speed).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.ops.triton_support import jit as _jit, tl, triton  # noqa: F401

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def fp8_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """The per-tensor scale [1] float32 that maps `amax` onto FP8's largest value."""
    amax = torch.as_tensor(amax, dtype=torch.float32).reshape(1)
    return amax.clamp(min=1e-12) / FP8_MAX


def quantize_fp8(tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`tensor / scale` rounded to float8_e4m3fn (saturating at +-448); one Triton kernel on CUDA."""
    if tensor.is_cuda and triton is not None and tensor.is_contiguous():
        return quantize_fp8_triton(tensor, scale)
    return (tensor.float() / scale.to(tensor.device)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


@_jit
def _quantize_fp8_kernel(x_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = tl.clamp(x / tl.load(scale_ptr), -448.0, 448.0)
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


def quantize_fp8_triton(tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = torch.empty(tensor.shape, dtype=FP8_DTYPE, device=tensor.device)
    n = tensor.numel()
    block = 1024
    _quantize_fp8_kernel[(triton.cdiv(n, block),)](tensor, scale, out, n, BLOCK=block)
    return out


@functools.cache
def fp8_gemm_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """y = x W^T (no bias) with W in FP8 and per-tensor weight and input scales."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_fp8 = quantize_fp8(x2, self.input_scale)
        if fp8_gemm_supported(x.device):
            # mat2 must be column-major: W^T of a row-major [out, in] weight is
            y = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                                 out_dtype=x.dtype)
        else:
            x_deq = (x_fp8.float() * self.input_scale).to(x.dtype)
            y = F.linear(x_deq, (self.weight.float() * self.weight_scale).to(x.dtype))
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 per-tensor"
