"""INT8 SmoothQuant (TensorRT-LLM `quant_algo` W8A8_SQ_PER_CHANNEL, the layout ModelOpt exports).

Activation outliers live in a few input channels; SmoothQuant moves part of their range into the
weights: per input channel j, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), W' = W * s and
X' = X / s (the product is unchanged). Per linear the checkpoint holds the int8 weight of W' [out, in],
`weights_scaling_factor` (out,) float32 (max |W'| of each row / 127), `activation_scaling_factor` (1,)
float32 (max |X'| / 127 over calibration) and `prequant_scaling_factor` (in,) = 1 / s in the model
dtype. Scales come from whole weights: column layers split their weight scales with the rows, row
layers split their prequant scales with the inputs, the rest is the same on every rank. q, k and v
are smoothed and quantized as one matrix, and so are gate and up (they share an input, and the
native runtime runs them as one GEMM). alpha 0 turns smoothing off (s = 1): the same W8A8 scheme
without it, for comparison.
"""

from __future__ import annotations

import torch

from llmserve.checkpoint import names
from llmserve.checkpoint.model_config import ModelConfig
from llmserve.ops.int8_sq_linear import INT8_MAX, quantize_int8

ALGO = "W8A8_SQ_PER_CHANNEL"


def smooth_quantize(weight: torch.Tensor, input_amax: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """SmoothQuant of one [out, in] weight given its input's per-channel max |x|: the int8 weight and the
    three scales (weight per output channel, input per tensor, prequant per input channel)."""
    weight = weight.float()
    input_amax = input_amax.float().clamp(min=1e-5)
    if alpha > 0:
        weight_amax = weight.abs().amax(dim=0).clamp(min=1e-5)  # per input channel
        smoothing = (input_amax.pow(alpha) / weight_amax.pow(1 - alpha)).clamp(min=1e-5)
    else:
        smoothing = torch.ones_like(input_amax)
    smoothed = weight * smoothing
    weight_scale = smoothed.abs().amax(dim=1).clamp(min=1e-8) / INT8_MAX
    return {"weight": quantize_int8(smoothed, weight_scale[:, None]), names.WEIGHT_SCALE: weight_scale,
            names.INPUT_SCALE: ((input_amax / smoothing).max() / INT8_MAX).reshape(1),
            names.PREQUANT_SCALE: 1.0 / smoothing}


class SmoothQuantizer:
    """The converter's W8A8_SQ_PER_CHANNEL linears: whole weights smoothed and quantized (one layer at a
    time, kept while that layer's linears are written), then each rank's slices."""

    quant_algo = ALGO

    def __init__(self, config: ModelConfig, input_amax: dict[str, torch.Tensor], alpha: float, dtype: torch.dtype):
        self.config, self.input_amax, self.alpha, self.dtype = config, input_amax, alpha, dtype
        self._layer: int | None = None
        self._quantized: dict[str, dict[str, torch.Tensor]] = {}

    def rank_linear(self, get, layer: int, local: int, linear: str, mapping, rank: int):
        from llmserve.checkpoint.convert import split_column, split_output_rows, split_row

        tensors = self._whole_layer(get, layer)[linear]
        tp, tp_rank = mapping.tp_size, mapping.tp_rank(rank)
        column = lambda t: split_output_rows(t, linear, self.config, tp, tp_rank)  # noqa: E731
        row_layer = linear in names.ROW_PARALLEL_LINEARS
        weight = split_row(tensors["weight"], tp, tp_rank) if row_layer else column(tensors["weight"])
        yield names.trt_layer(local, f"{linear}.weight"), weight.contiguous()
        scales = {names.WEIGHT_SCALE: tensors[names.WEIGHT_SCALE] if row_layer else column(tensors[names.WEIGHT_SCALE]),
                  names.INPUT_SCALE: tensors[names.INPUT_SCALE],
                  names.PREQUANT_SCALE: (split_column(tensors[names.PREQUANT_SCALE], tp, tp_rank) if row_layer
                                         else tensors[names.PREQUANT_SCALE]).to(self.dtype)}
        for suffix in names.quant_scale_suffixes(linear, ALGO):
            yield names.trt_layer(local, suffix), scales[suffix.rpartition(".")[2]].contiguous().clone()

    def _whole_layer(self, get, layer: int) -> dict[str, dict[str, torch.Tensor]]:
        if self._layer != layer:
            hf = lambda suffix: get(names.hf_layer(layer, suffix))  # noqa: E731
            amax = lambda group: self.input_amax[names.trt_layer(layer, group)]  # noqa: E731
            qkv = smooth_quantize(torch.cat([hf(s) for s in names.QKV_HF]), amax("attention.qkv"), self.alpha)
            dense = smooth_quantize(hf("self_attn.o_proj.weight"), amax("attention.dense"), self.alpha)
            gate_up = smooth_quantize(torch.cat([hf("mlp.gate_proj.weight"), hf("mlp.up_proj.weight")]),
                                      amax("mlp.gate_up"), self.alpha)
            proj = smooth_quantize(hf("mlp.down_proj.weight"), amax("mlp.proj"), self.alpha)
            size = self.config.intermediate_size
            halves = [{key: (t[:size] if key in ("weight", names.WEIGHT_SCALE) else t) for key, t in gate_up.items()},
                      {key: (t[size:] if key in ("weight", names.WEIGHT_SCALE) else t) for key, t in gate_up.items()}]
            self._quantized = {"attention.qkv": qkv, "attention.dense": dense, "mlp.fc": halves[0],
                               "mlp.gate": halves[1], "mlp.proj": proj}
            self._layer = layer
        return self._quantized


# ---- loading into the native model ---------------------------------------------------------
def use_linears(model: torch.nn.Module) -> None:
    """Replace each decoder layer's linears by W8A8 SmoothQuant ones of the same (per-rank) shape."""
    from llmserve.ops.int8_sq_linear import Int8SqLinear
    from llmserve.quantization.native import replace_linears

    replace_linears(model, lambda i, path, linear: Int8SqLinear(linear.in_features, linear.out_features,
                                                                device=linear.weight.device))


def checkpoint_tensors(tensors):
    """A checkpoint's SmoothQuant tensors under the native modules' names: `mlp.fc` + `mlp.gate` fused into
    `mlp.gate_up` (per-channel weight scales concatenate; they must share the prequant scales, as they
    share their input)."""
    from llmserve.quantization.native import native_tensors

    return native_tensors(tensors, ALGO, _fused_gate_up)


def _fused_gate_up(mlp: str, parts: dict[str, torch.Tensor]):
    from llmserve.quantization.native import shared_prequant

    prequant = shared_prequant(mlp, parts, "smoothed")
    yield f"{mlp}.gate_up.weight", torch.cat([parts["fc.weight"], parts["gate.weight"]])
    yield f"{mlp}.gate_up.weight_scale", torch.cat([parts[f"fc.{names.WEIGHT_SCALE}"], parts[f"gate.{names.WEIGHT_SCALE}"]])
    yield f"{mlp}.gate_up.input_scale", torch.maximum(parts[f"fc.{names.INPUT_SCALE}"].float(),
                                                      parts[f"gate.{names.INPUT_SCALE}"].float())
    yield f"{mlp}.gate_up.prequant_scale", prequant


@torch.no_grad()
def quantize_native_int8_sq(model: torch.nn.Module, input_amax: dict[str, torch.Tensor], alpha: float = 0.5) -> None:
    """Turn a loaded (unquantized) native model's decoder linears into SmoothQuant ones in place, from
    their weights and `input_amax` (`calibrate.recording_input_amax`)."""
    from llmserve.ops.int8_sq_linear import Int8SqLinear
    from llmserve.quantization.native import replace_linears

    def make(i: int, path: str, linear: torch.nn.Module) -> Int8SqLinear:
        amax = input_amax[f"transformer.layers.{i}.{path}"].to(linear.weight.device)
        quantized = smooth_quantize(linear.weight, amax, alpha)
        sq = Int8SqLinear(linear.in_features, linear.out_features, device=linear.weight.device)
        sq.weight.copy_(quantized["weight"])
        sq.weight_scale.copy_(quantized[names.WEIGHT_SCALE])
        sq.input_scale.copy_(quantized[names.INPUT_SCALE])
        sq.prequant_scale.copy_(quantized[names.PREQUANT_SCALE])
        return sq
    replace_linears(model, make)
