"""Opt-in CPU weight quantization: int8 per-channel weights, int8 dynamic activations.

On CPUs without bf16/AMX units, float32 GEMMs at decode batch sizes are the bottleneck;
fbgemm's int8 GEMM about halves them. Greedy output then differs slightly from float32
(the default), like any quantized runtime (llama.cpp runs the default model in Q4_1).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


class Int8DynamicLinear(nn.Module):
    """y = x @ W.T with W stored as per-output-channel symmetric int8 (fbgemm packed)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().float()
        scales = (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-8)
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensor creation is deprecated but still the fbgemm path
            warnings.simplefilter("ignore")
            qweight = torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qweight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float(), self.packed, True)
        return out.view(*shape[:-1], self.out_features).to(x.dtype)


def quantize_linears_int8(model: nn.Module) -> nn.Module:
    """Replace every bias-free nn.Linear and the lm_head matmul by int8 versions, in place."""
    assert "fbgemm" in torch.backends.quantized.supported_engines, "int8 needs fbgemm (x86 CPUs)"
    torch.backends.quantized.engine = "fbgemm"
    lm_head = model.lm_head if model.lm_head is not None else model.transformer.vocab_embedding
    model.logits_linear = Int8DynamicLinear(lm_head.weight)
    model.lm_head = None  # logits_linear replaces it; the float weights are not needed
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(parent, name, Int8DynamicLinear(child.weight))
    return model
