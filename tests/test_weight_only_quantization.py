"""Weight-only checkpoints (`--quantization int8-wo|int4-wo`): TensorRT-LLM's W8A16 and W4A16_AWQ
names, shapes and values, AWQ's scaling, and the native runtime running them at any split."""

from __future__ import annotations

import json

import pytest
import torch

from llmserve.checkpoint.architectures import UnsupportedModelError, check_trtllm_config
from llmserve.quantization.schemes import convert_quantized
from llmserve.quantization.weight_only import (awq_quantize, dequantize_int4_groups, quantize_int4_groups,
                                               quantize_int8_per_channel)
from tests.conftest import CALIBRATION_TEXTS as TEXTS
from tests.test_quantization import LINEARS, _logits, _rank

GROUP = 16  # divides the tiny model's inputs on each of 2 tensor ranks


@pytest.fixture(scope="module")
def wo_dirs(quantization_source, tmp_path_factory):
    """quantization -> tp -> converted folder."""
    _, path, calibration = quantization_source
    return {q: {tp: convert_quantized(path, tmp_path_factory.mktemp(f"{q}-tp{tp}"), q, calibration=calibration,
                                      group_size=GROUP, tp_size=tp, progress=False) for tp in (1, 2)}
            for q in ("int8-wo", "int4-wo")}


def _originals(hf, layer: int) -> dict[str, torch.Tensor]:
    state, p = hf.state_dict(), f"model.layers.{layer}."
    return {"attention.qkv": torch.cat([state[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
            "attention.dense": state[p + "self_attn.o_proj.weight"], "mlp.fc": state[p + "mlp.gate_proj.weight"],
            "mlp.gate": state[p + "mlp.up_proj.weight"], "mlp.proj": state[p + "mlp.down_proj.weight"]}


def test_int8_wo_is_modelopts_w8a16_export(quantization_source, wo_dirs):
    """Model-dtype weights under the unquantized names, no scale tensors: trtllm-build quantizes them."""
    hf, _, _ = quantization_source
    config = json.loads((wo_dirs["int8-wo"][1] / "config.json").read_text())
    assert config["quantization"] == {"quant_algo": "W8A16", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    tensors = _rank(wo_dirs["int8-wo"][1], 0)
    assert not any("scaling_factor" in name for name in tensors)
    for layer in range(hf.config.num_hidden_layers):
        for linear, original in _originals(hf, layer).items():
            assert torch.equal(tensors[f"transformer.layers.{layer}.{linear}.weight"], original)


def test_int4_wo_tensors_have_tensorrt_llms_awq_names_dtypes_and_shapes(quantization_source, wo_dirs):
    hf, _, _ = quantization_source
    config = json.loads((wo_dirs["int4-wo"][2] / "config.json").read_text())
    assert config["quantization"] == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None,
                                      "exclude_modules": ["lm_head"], "group_size": GROUP, "has_zero_point": False,
                                      "pre_quant_scale": True}
    for tp, path in wo_dirs["int4-wo"].items():
        for rank in range(tp):
            tensors = _rank(path, rank)
            for layer in range(hf.config.num_hidden_layers):
                for linear, original in _originals(hf, layer).items():
                    out, inp = original.shape
                    out, inp = (out // tp, inp) if LINEARS[linear] == "column" else (out, inp // tp)
                    prefix = f"transformer.layers.{layer}.{linear}"
                    weight = tensors[f"{prefix}.weight"]
                    assert weight.dtype == torch.int8 and tuple(weight.shape) == (out // 2, inp)  # packed on out
                    scale, prequant = tensors[f"{prefix}.weights_scaling_factor"], tensors[f"{prefix}.prequant_scaling_factor"]
                    assert scale.dtype == prequant.dtype == torch.float32  # the model dtype
                    assert tuple(scale.shape) == (out, inp // GROUP) and tuple(prequant.shape) == (inp,)
                prefix = f"transformer.layers.{layer}.mlp"
                assert torch.equal(tensors[f"{prefix}.fc.prequant_scaling_factor"],
                                   tensors[f"{prefix}.gate.prequant_scaling_factor"])  # one input, one GEMM


def test_int4_wo_weights_dequantize_to_the_originals_within_half_a_step(quantization_source, wo_dirs):
    from llmserve.ops.weight_only_linear import unpack_int4

    hf, _, _ = quantization_source
    tensors = _rank(wo_dirs["int4-wo"][1], 0)
    for layer in range(hf.config.num_hidden_layers):
        for linear, original in _originals(hf, layer).items():
            prefix = f"transformer.layers.{layer}.{linear}"
            values = unpack_int4(tensors[f"{prefix}.weight"])
            assert values.min() >= -8 and values.max() <= 7
            scale, prequant = tensors[f"{prefix}.weights_scaling_factor"], tensors[f"{prefix}.prequant_scaling_factor"]
            # W * s was quantized (s = 1 / prequant): back in W's units a step is scale * prequant
            step = scale.repeat_interleave(GROUP, dim=1) * prequant
            error = (dequantize_int4_groups(values, scale) * prequant - original).abs()
            assert (error <= step / 2 * (1 + 1e-5) + 1e-7).all(), linear


@pytest.mark.parametrize("quantization, bound", [("int8-wo", 0.02), ("int4-wo", 0.2)])
def test_a_weight_only_checkpoint_runs_close_to_float32_and_alike_at_any_split(quantization_source, wo_dirs, quantization,
                                                                                bound, tokenizer):
    hf, _, _ = quantization_source
    tokens = tokenizer.encode(TEXTS[0])
    with torch.no_grad():
        want = hf(torch.tensor([tokens])).logits[0]
    got = _logits(wo_dirs[quantization][1], tokens)
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < bound, f"{quantization} logits relative error {error}"
    # the tp=2 shards (packed int4 rows, split group scales) merge back into the tp=1 tensors exactly;
    # W8A16's per-channel scales come from whole rows either way
    assert torch.equal(_logits(wo_dirs[quantization][2], tokens), got)


def test_int8_per_channel_follows_tensorrt_llm_amax_over_128():
    weight = torch.tensor([[1.0, -0.5, 0.25], [-2.0, 1.0, 0.0]])
    values, scale = quantize_int8_per_channel(weight)
    assert torch.equal(scale, torch.tensor([1 / 128, 2 / 128]))
    assert values.tolist() == [[127, -64, 32], [-128, 64, 0]]  # +amax clips to 127, -amax is exact


def test_awq_scaling_beats_round_to_nearest_on_outlier_channels():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=generator)
    magnitude = torch.ones(128)
    magnitude[::16] = 30.0  # a few loud input channels, as LLM activations have
    x = torch.randn(256, 128, generator=generator) * magnitude
    awq = awq_quantize(weight, magnitude, group_size=32)
    rtn_values, rtn_scale = quantize_int4_groups(weight, 32)

    def output_error(dequantized: torch.Tensor) -> float:
        return (x @ dequantized.T - x @ weight.T).norm().item()
    awq_error = output_error(dequantize_int4_groups(awq["values"], awq["scale"]) * awq["prequant"])
    rtn_error = output_error(dequantize_int4_groups(rtn_values, rtn_scale))
    assert awq_error < 0.8 * rtn_error, (awq_error, rtn_error)


def test_a_group_size_that_does_not_split_the_inputs_is_refused_before_calibrating(quantization_source, tmp_path):
    _, path, calibration = quantization_source
    with pytest.raises(ValueError, match="--group-size 48 does not divide"):
        convert_quantized(path, tmp_path / "out", "int4-wo", calibration=calibration, group_size=48, progress=False)
    with pytest.raises(ValueError, match="head_dim / tp = 16; 16 would"):  # 64 / 4 ranks, groups of 64
        convert_quantized(path, tmp_path / "out", "int4-wo", calibration=calibration, group_size=64, tp_size=4,
                          progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("quantization, message", [
    ({"quant_algo": "W4A16_AWQ"}, "needs a positive integer quantization.group_size"),
    ({"quant_algo": "W4A16_AWQ", "group_size": 128, "has_zero_point": True}, "with zero points"),
    ({"quant_algo": "W4A16_GPTQ", "group_size": 128}, "W4A16_GPTQ are not supported")])
def test_weight_only_checkpoints_we_cannot_run_are_refused(quantization, message):
    with pytest.raises(UnsupportedModelError, match=message):
        check_trtllm_config({"architecture": "LlamaForCausalLM", "quantization": quantization})


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8-wo", "int4-wo"])
def test_a_weight_only_checkpoint_runs_at_tp2_like_at_tp1(wo_dirs, quantization, tokenizer):
    """Each tensor rank loads its own shard (packed row-parallel int4 included) and scores the prompts as
    one process does on the tp=1 conversion. Not bit for bit: on CPUs with bf16 units the linears take
    bf16 inputs, and a row-parallel rank rounds its partial sum before the ranks add them; W8A16 is
    also quantized per rank, as trtllm-build does (a row-parallel rank's scales see half the row)."""
    from llmserve.llm import LLM
    from llmserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    prompts = [tokenizer.encode(text) for text in TEXTS[:3]]

    def scores(path, **flags) -> list[float]:
        with LLM(str(path), **flags) as llm:
            return [t.logprob for r in llm.generate(prompts, params) for t in r.prompt_logprobs[1:]]
    want = scores(wo_dirs[quantization][1])
    got = scores(wo_dirs[quantization][2], tensor_parallel_size=2)
    assert len(got) == len(want) == sum(len(p) - 1 for p in prompts)
    assert got == pytest.approx(want, abs=2e-2)
