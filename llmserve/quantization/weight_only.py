"""Weight-only INT8 and INT4 (TensorRT-LLM `W8A16` and `W4A16_AWQ`): weights quantized, inputs not.

W8A16 is written the way ModelOpt exports it: the checkpoint keeps the model-dtype weights and says
`quant_algo: W8A16`, and trtllm-build quantizes them (per output channel, scale = amax / 128, values
in [-128, 127]) into the CUTLASS layout of the GPU it builds for. No int8 tensor is stored because
that layout depends on the GPU architecture, and TensorRT-LLM takes any stored int8 weight as
already in it. The native runtime applies the same quantization when it loads the checkpoint.

W4A16_AWQ is group-wise INT4 with AWQ's activation-aware scaling, in ModelOpt's layout. Per linear:
- `weight`: int8 [out/2, in], two int4 per byte along the output dim (row 2r in the low nibble);
- `weights_scaling_factor`: [out, in/group] in the model dtype, each group's amax / 7 (values in [-8, 7]);
- `prequant_scaling_factor`: [in] in the model dtype, multiplies the input; it is 1 / s, where the weight
  was scaled by s per input channel before it was quantized.
s = a^alpha (normalised), a being each input channel's calibrated max |x|. alpha is searched per linear
on a grid. The search minimises sum_j a_j^2 * ||dequant(Q(W s))[:, j] / s_j - W[:, j]||^2, the output
error if the input channels were independent with magnitudes a_j. alpha = 0 is plain round-to-nearest,
so the search never does worse than that by this measure. q/k/v share one s, and so do gate/up: each
group shares an input.
"""

from __future__ import annotations

import torch

from llmserve.checkpoint import names
from llmserve.checkpoint.model_config import ModelConfig

W8A16, W4A16_AWQ = "W8A16", "W4A16_AWQ"
INT4_MAX = 7.0
ALPHA_GRID = tuple(step / 10 for step in range(11))


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TensorRT-LLM's W8A16 quantization of an [out, in] weight: int8 values, float32 scales [out]."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 128.0
    return (weight / scale[:, None]).round().clamp(-128, 127).to(torch.int8), scale


def quantize_int4_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> int4 values in [-8, 7] as int8 [out, in], float32 scales [out, in / group_size]."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    scale = groups.abs().amax(dim=2).clamp(min=1e-8) / INT4_MAX
    values = (groups / scale[..., None]).round().clamp(-8, 7).to(torch.int8)
    return values.reshape(out_features, in_features), scale


def dequantize_int4_groups(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_int4_groups` (up to rounding), float32 [out, in]."""
    out_features, in_features = values.shape
    groups = values.float().reshape(out_features, scale.shape[1], -1) * scale[..., None]
    return groups.reshape(out_features, in_features)


def awq_smoothing(weight: torch.Tensor, input_amax: torch.Tensor, group_size: int) -> torch.Tensor:
    """The per-input-channel s [in] (float32) that AWQ's grid search picks for one [out, in] weight."""
    weight = weight.float()
    amax = input_amax.float().to(weight.device).clamp(min=1e-5)
    importance = amax.square()
    best, best_error = torch.ones_like(amax), float("inf")
    for alpha in ALPHA_GRID:
        s = amax.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centred on 1: keeps the scaled weights' range moderate
        values, scale = quantize_int4_groups(weight * s, group_size)
        error = ((dequantize_int4_groups(values, scale) / s - weight).square().sum(dim=0) * importance).sum().item()
        if error < best_error:
            best, best_error = s, error
    return best


def awq_quantize(weight: torch.Tensor, input_amax: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """One [out, in] weight AWQ-scaled and quantized: unpacked int4 `values`, `scale`, `prequant` = 1 / s."""
    s = awq_smoothing(weight, input_amax, group_size)
    values, scale = quantize_int4_groups(weight.float() * s, group_size)
    return {"values": values, "scale": scale, "prequant": 1.0 / s}


def check_group_size(config: ModelConfig, group_size: int, tp_size: int = 1) -> None:
    """ValueError unless `group_size` splits every quantized linear's input on each tensor rank."""
    if group_size < 1:
        raise ValueError(f"--group-size must be positive, got {group_size}")
    inputs = {"hidden_size": config.hidden_size,
              "num_attention_heads * head_dim / tp": config.num_attention_heads * config.head_dim // tp_size,
              "intermediate_size / tp": config.intermediate_size // tp_size}
    for what, size in inputs.items():
        if size % group_size:
            fitting = [g for g in (256, 128, 64, 32, 16) if all(n % g == 0 for n in inputs.values())]
            hint = f"; {fitting[0]} would" if fitting else ""
            raise ValueError(f"--group-size {group_size} does not divide {what} = {size}{hint}")


class Int8WeightOnlyQuantizer:
    """The converter's W8A16 linears: each rank's model-dtype slice, as ModelOpt writes them."""

    quant_algo = W8A16

    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        self.config, self.dtype = config, dtype

    def rank_linear(self, get, layer: int, local: int, linear: str, mapping, rank: int):
        from llmserve.checkpoint.convert import rank_slice

        weight = rank_slice(get, self.config, layer, linear, mapping.tp_size, mapping.tp_rank(rank))
        yield names.trt_layer(local, f"{linear}.weight"), weight.to(self.dtype, copy=True).contiguous()


class AwqQuantizer:
    """The converter's W4A16_AWQ linears: whole weights scaled and quantized (a layer at a time, kept
    while its linears are written), then each rank's slices packed."""

    quant_algo = W4A16_AWQ

    def __init__(self, config: ModelConfig, input_amax: dict[str, torch.Tensor], group_size: int,
                 dtype: torch.dtype):
        check_group_size(config, group_size)
        self.config, self.input_amax, self.group_size, self.dtype = config, input_amax, group_size, dtype
        self._layer: int | None = None
        self._quantized: dict[str, dict[str, torch.Tensor]] = {}

    def rank_linear(self, get, layer: int, local: int, linear: str, mapping, rank: int):
        from llmserve.checkpoint.convert import split_column, split_output_rows, split_row
        from llmserve.ops.weight_only_linear import pack_int4

        whole = self._whole_layer(get, layer)[linear]
        tp, tp_rank = mapping.tp_size, mapping.tp_rank(rank)
        if linear in names.ROW_PARALLEL_LINEARS:  # inputs split: values and scale columns, prequant
            values, scale = split_row(whole["values"], tp, tp_rank), split_row(whole["scale"], tp, tp_rank)
            prequant = split_column(whole["prequant"], tp, tp_rank)
        else:  # output rows split; every rank sees the whole input
            rows = lambda t: split_output_rows(t, linear, self.config, tp, tp_rank)  # noqa: E731
            values, scale, prequant = rows(whole["values"]), rows(whole["scale"]), whole["prequant"]
        yield names.trt_layer(local, f"{linear}.weight"), pack_int4(values.contiguous())
        yield names.trt_layer(local, f"{linear}.{names.WEIGHT_SCALE}"), scale.to(self.dtype, copy=True).contiguous()
        yield names.trt_layer(local, f"{linear}.{names.PREQUANT_SCALE}"), prequant.to(self.dtype, copy=True).contiguous()

    def _whole_layer(self, get, layer: int) -> dict[str, dict[str, torch.Tensor]]:
        if self._layer != layer:
            hf = lambda suffix: get(names.hf_layer(layer, suffix))  # noqa: E731
            amax = lambda group: self.input_amax[names.trt_layer(layer, group)]  # noqa: E731
            g = self.group_size
            gate_up = awq_quantize(torch.cat([hf("mlp.gate_proj.weight"), hf("mlp.up_proj.weight")]),
                                   amax("mlp.gate_up"), g)
            size = self.config.intermediate_size
            half = lambda rows: {"values": gate_up["values"][rows], "scale": gate_up["scale"][rows],  # noqa: E731
                                 "prequant": gate_up["prequant"]}
            self._quantized = {
                "attention.qkv": awq_quantize(torch.cat([hf(s) for s in names.QKV_HF]), amax("attention.qkv"), g),
                "attention.dense": awq_quantize(hf("self_attn.o_proj.weight"), amax("attention.dense"), g),
                "mlp.fc": half(slice(0, size)), "mlp.gate": half(slice(size, None)),
                "mlp.proj": awq_quantize(hf("mlp.down_proj.weight"), amax("mlp.proj"), g),
            }
            self._layer = layer
        return self._quantized


# ---- loading into the native model ---------------------------------------------------------
class NativeScheme:
    """`runtime.scheme(quant_algo)` for W8A16 and W4A16_AWQ."""

    def __init__(self, quant_algo: str):
        self.quant_algo = quant_algo

    def use_linears(self, model: torch.nn.Module) -> None:
        """Replace each decoder layer's linears by weight-only ones of the same (per-rank) shape."""
        from llmserve.ops.weight_only_linear import WeightOnlyLinear
        from llmserve.quantization.native import replace_linears

        bits, group_size = (8, None) if self.quant_algo == W8A16 else (4, model.config.quant_group_size)
        replace_linears(model, lambda i, path, linear: WeightOnlyLinear(
            linear.in_features, linear.out_features, bits, group_size, has_prequant=bits == 4,
            device=linear.weight.device))

    def checkpoint_tensors(self, tensors):
        """The checkpoint's tensors under the native modules' names, `mlp.fc` + `mlp.gate` fused into
        `mlp.gate_up`; W8A16's model-dtype weights are quantized here, as trtllm-build would."""
        from llmserve.quantization.native import native_tensors

        if self.quant_algo == W4A16_AWQ:
            return native_tensors(tensors, self.quant_algo, _fused_awq_gate_up)
        return _int8_quantized(native_tensors(tensors, self.quant_algo, _fused_gate_up_weight))


def _fused_gate_up_weight(mlp: str, parts: dict[str, torch.Tensor]):
    yield f"{mlp}.gate_up.weight", torch.cat([parts["fc.weight"], parts["gate.weight"]])


def _int8_quantized(tensors):
    from llmserve.quantization.native import NATIVE_LINEARS

    linears = tuple(f"{path}.weight" for path in NATIVE_LINEARS)
    for name, tensor in tensors:
        if name.endswith(linears):
            values, scale = quantize_int8_per_channel(tensor)
            yield name, values
            yield f"{name.removesuffix('.weight')}.weight_scale", scale
        else:
            yield name, tensor


def _fused_awq_gate_up(mlp: str, parts: dict[str, torch.Tensor]):
    from llmserve.quantization.native import shared_prequant

    prequant = shared_prequant(mlp, parts, "AWQ-scaled")
    yield f"{mlp}.gate_up.weight", torch.cat([parts["fc.weight"], parts["gate.weight"]])
    yield f"{mlp}.gate_up.weight_scale", torch.cat([parts[f"fc.{names.WEIGHT_SCALE}"],
                                                    parts[f"gate.{names.WEIGHT_SCALE}"]]).float()
    yield f"{mlp}.gate_up.prequant_scale", prequant


@torch.no_grad()
def quantize_native_weight_only(model: torch.nn.Module, bits: int, group_size: int | None = None,
                                input_amax: dict[str, torch.Tensor] | None = None) -> None:
    """Turn a loaded (unquantized) native model's decoder linears into weight-only ones in place: INT8 per
    channel, or INT4 groups with AWQ scaling from `input_amax` (plain round-to-nearest without it)."""
    from llmserve.ops.weight_only_linear import WeightOnlyLinear, pack_int4
    from llmserve.quantization.native import replace_linears

    def make(i: int, path: str, linear: torch.nn.Module) -> WeightOnlyLinear:
        module = WeightOnlyLinear(linear.in_features, linear.out_features, bits, group_size, has_prequant=bits == 4,
                                  device=linear.weight.device)
        if bits == 8:
            values, scale = quantize_int8_per_channel(linear.weight)
            module.weight.copy_(values)
        else:
            if input_amax:
                amax = input_amax[f"transformer.layers.{i}.{path}"].to(linear.weight.device)
                quantized = awq_quantize(linear.weight, amax, group_size)
                values, scale = quantized["values"], quantized["scale"]
                module.prequant_scale.copy_(quantized["prequant"])
            else:  # no statistics: plain round-to-nearest (prequant stays 1)
                values, scale = quantize_int4_groups(linear.weight, group_size)
            module.weight.copy_(pack_int4(values))
        module.weight_scale.copy_(scale)
        return module
    replace_linears(model, make)


@torch.no_grad()
def int8_lm_head(model: torch.nn.Module) -> None:
    """Run the LM head (this rank's rows of it) as W8A16 too. CPU decode reads every LM head byte each token
    (SmolLM2's tied 49152 x 576 head: 113 MB in float32, two thirds of what an INT4 step reads), while
    the checkpoint keeps it unquantized (`exclude_modules`), as TensorRT-LLM expects."""
    from llmserve.ops.weight_only_linear import WeightOnlyLinear

    weight = model.transformer.vocab_embedding.weight if model.lm_head is None else model.lm_head.weight
    head = WeightOnlyLinear(weight.shape[1], weight.shape[0], 8, has_prequant=False, device=weight.device)
    values, scale = quantize_int8_per_channel(weight)
    head.weight.copy_(values)
    head.weight_scale.copy_(scale)
    model.logits_linear, model.lm_head = head, None  # a tied head keeps its embedding for the lookups
