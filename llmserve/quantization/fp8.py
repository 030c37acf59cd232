"""FP8 (TensorRT-LLM `quant_algo` FP8): per-tensor scales of every linear layer but the LM head.

Weight scales come from the whole (unsplit) weights, so every tensor-parallel rank holds the same
scalars; input scales from calibration (`calibrate.input_amax`). The native runtime runs gate and
up as one GEMM, so the converter gives `mlp.fc` and `mlp.gate` one weight scale (a checkpoint from
elsewhere with two is requantized to the larger at load).
"""

from __future__ import annotations

from typing import Callable

import torch

from llmserve.checkpoint import names
from llmserve.checkpoint.model_config import ModelConfig
from llmserve.ops.fp8_linear import fp8_scale

Scales = dict[str, tuple[torch.Tensor, torch.Tensor]]  # linear (global TRT name) -> (weight scale, input scale)


class Fp8Quantizer:
    """The converter's FP8 linears: each rank's slice of a weight quantized with the whole weight's scale."""

    quant_algo = "FP8"

    def __init__(self, get: Callable[[str], torch.Tensor], config: ModelConfig, input_amax: dict[str, torch.Tensor]):
        self.config = config
        self.scales = fp8_scales(get, config, input_amax)

    def rank_linear(self, get, layer: int, local: int, linear: str, mapping, rank: int):
        from llmserve.checkpoint.convert import rank_slice
        from llmserve.ops.fp8_linear import quantize_fp8

        weight = rank_slice(get, self.config, layer, linear, mapping.tp_size, mapping.tp_rank(rank))
        weight_scale, input_scale = self.scales[names.trt_layer(layer, linear)]
        yield names.trt_layer(local, f"{linear}.weight"), quantize_fp8(weight, weight_scale).contiguous()
        for suffix, scale in zip(names.quant_scale_suffixes(linear, "FP8"), (weight_scale, input_scale)):
            yield names.trt_layer(local, suffix), scale.clone()


def fp8_scales(get: Callable[[str], torch.Tensor], config: ModelConfig, input_amax: dict[str, torch.Tensor]) -> Scales:
    """(weight scale, input scale), each [1] float32, of every FP8 linear, keyed `transformer.layers.{i}.mlp.fc`."""
    scales: Scales = {}
    for i in range(config.num_hidden_layers):
        def weight_amax(*hf_suffixes: str) -> torch.Tensor:
            return torch.stack([get(names.hf_layer(i, s)).abs().max().float() for s in hf_suffixes]).max()

        def input_scale(linear: str) -> torch.Tensor:
            return fp8_scale(input_amax[names.trt_layer(i, linear)].max())

        gate_up = (fp8_scale(weight_amax("mlp.gate_proj.weight", "mlp.up_proj.weight")), input_scale("mlp.gate_up"))
        scales |= {
            names.trt_layer(i, "attention.qkv"): (fp8_scale(weight_amax(*names.QKV_HF)), input_scale("attention.qkv")),
            names.trt_layer(i, "attention.dense"): (fp8_scale(weight_amax("self_attn.o_proj.weight")),
                                                    input_scale("attention.dense")),
            names.trt_layer(i, "mlp.fc"): gate_up,
            names.trt_layer(i, "mlp.gate"): gate_up,
            names.trt_layer(i, "mlp.proj"): (fp8_scale(weight_amax("mlp.down_proj.weight")), input_scale("mlp.proj")),
        }
    return scales


# ---- loading into the native model ---------------------------------------------------------
def use_linears(model: torch.nn.Module) -> None:
    """Replace each decoder layer's linears by FP8 ones of the same (per-rank) shape, on the same device."""
    from llmserve.ops.fp8_linear import Fp8Linear
    from llmserve.quantization.native import replace_linears

    replace_linears(model, lambda i, path, linear: Fp8Linear(linear.in_features, linear.out_features,
                                                             device=linear.weight.device))


def checkpoint_tensors(tensors):
    """A checkpoint's FP8 tensors under the native modules' names (`mlp.fc` + `mlp.gate` fused into
    `mlp.gate_up` on one weight scale)."""
    from llmserve.quantization.native import native_tensors

    return native_tensors(tensors, "FP8", _fused_gate_up)


def _fused_gate_up(mlp: str, parts: dict[str, torch.Tensor]):
    from llmserve.ops.fp8_linear import quantize_fp8

    scales = [parts[f"{m}.{names.WEIGHT_SCALE}"].float().reshape(1) for m in ("fc", "gate")]
    weight_scale = torch.maximum(*scales)
    weights = []
    for module, scale in zip(("fc", "gate"), scales):
        weight = parts[f"{module}.weight"]
        # a checkpoint from elsewhere may scale the two apart: requantize onto the larger scale
        weights.append(weight if torch.equal(scale, weight_scale) else quantize_fp8(weight.float() * scale, weight_scale))
    input_scale = torch.maximum(*(parts[f"{m}.{names.INPUT_SCALE}"].float().reshape(1) for m in ("fc", "gate")))
    yield f"{mlp}.gate_up.weight", torch.cat(weights, dim=0)
    yield f"{mlp}.gate_up.weight_scale", weight_scale
    yield f"{mlp}.gate_up.input_scale", input_scale


@torch.no_grad()
def quantize_native_fp8(model: torch.nn.Module, input_amax: dict[str, torch.Tensor]) -> None:
    """Turn a loaded (unquantized) native model's decoder linears into FP8 ones in place: weight scales
    from the weights, input scales from `input_amax` (`calibrate.recording_input_amax`)."""
    from llmserve.ops.fp8_linear import Fp8Linear, fp8_scale, quantize_fp8
    from llmserve.quantization.native import replace_linears

    def make(i: int, path: str, linear: torch.nn.Module) -> Fp8Linear:
        fp8 = Fp8Linear(linear.in_features, linear.out_features, device=linear.weight.device)
        fp8.weight_scale.copy_(fp8_scale(linear.weight.abs().max().float()))
        fp8.weight.copy_(quantize_fp8(linear.weight, fp8.weight_scale))
        fp8.input_scale.copy_(fp8_scale(input_amax[f"transformer.layers.{i}.{path}"].max()))
        return fp8
    replace_linears(model, make)
