"""FP8 checkpoints: calibration, TensorRT-LLM's quantized tensor names and shapes, the native runtime."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from llmserve.checkpoint.architectures import UnsupportedModelError, check_trtllm_config
from llmserve.ops.fp8_linear import FP8_DTYPE, FP8_MAX, Fp8Linear, fp8_gemm_supported, fp8_scale, quantize_fp8
from llmserve.quantization.calibrate import CalibrationConfig, calibration_texts
from llmserve.quantization.schemes import convert_quantized
from tests.conftest import CALIBRATION_TEXTS as TEXTS, prefill_hidden

LINEARS = {"attention.qkv": "column", "attention.dense": "row", "mlp.fc": "column", "mlp.gate": "column",
           "mlp.proj": "row"}


@pytest.fixture(scope="module")
def source(quantization_source):
    return quantization_source


@pytest.fixture(scope="module")
def quantized_dirs(source, tmp_path_factory):
    """quantization -> tp -> converted folder (made on first use)."""
    _, path, calibration = source
    cache: dict[str, dict[int, object]] = {}

    def get(quantization: str) -> dict[int, object]:
        if quantization not in cache:
            cache[quantization] = {tp: convert_quantized(path, tmp_path_factory.mktemp(f"{quantization}-tp{tp}"),
                                                         quantization, calibration=calibration, tp_size=tp,
                                                         progress=False) for tp in (1, 2)}
        return cache[quantization]
    return get


@pytest.fixture(scope="module")
def fp8_dirs(quantized_dirs):
    return quantized_dirs("fp8")


@pytest.fixture(scope="module")
def sq_dirs(quantized_dirs):
    return quantized_dirs("int8-sq")


def _rank(path, rank: int) -> dict[str, torch.Tensor]:
    with safe_open(path / f"rank{rank}.safetensors", framework="pt") as shard:
        return {name: shard.get_tensor(name) for name in shard.keys()}


# ---- the checkpoint -------------------------------------------------------------------------
def test_fp8_config_names_the_algorithm_and_keeps_the_lm_head(fp8_dirs):
    config = json.loads((fp8_dirs[2] / "config.json").read_text())
    assert config["quantization"] == {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    assert config["dtype"] == "float32"


def test_fp8_tensors_have_tensorrt_llms_names_dtypes_and_shapes(source, fp8_dirs):
    hf, _, _ = source
    cfg = hf.config
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    full = {"attention.qkv": (cfg.hidden_size + 2 * kv, cfg.hidden_size), "attention.dense": (cfg.hidden_size,) * 2,
            "mlp.fc": (cfg.intermediate_size, cfg.hidden_size), "mlp.gate": (cfg.intermediate_size, cfg.hidden_size),
            "mlp.proj": (cfg.hidden_size, cfg.intermediate_size)}
    for tp, path in fp8_dirs.items():
        ranks = [_rank(path, r) for r in range(tp)]
        for layer in range(cfg.num_hidden_layers):
            for linear, split in LINEARS.items():
                prefix = f"transformer.layers.{layer}.{linear}"
                out, inp = full[linear]
                want = (out // tp, inp) if split == "column" else (out, inp // tp)
                for tensors in ranks:
                    assert tensors[f"{prefix}.weight"].dtype == FP8_DTYPE
                    assert tuple(tensors[f"{prefix}.weight"].shape) == want
                    for scale in ("weights_scaling_factor", "activation_scaling_factor"):
                        value = tensors[f"{prefix}.{scale}"]
                        assert value.dtype == torch.float32 and tuple(value.shape) == (1,) and value.item() > 0
                        assert torch.equal(value, ranks[0][f"{prefix}.{scale}"])  # replicated on every rank
        for tensors in ranks:
            assert tensors["lm_head.weight"].dtype == torch.float32
            assert not any(name.startswith("lm_head.") and name != "lm_head.weight" for name in tensors)


def test_fp8_weights_dequantize_to_the_originals_within_half_a_step(source, fp8_dirs):
    hf, _, _ = source
    state = hf.state_dict()
    tensors = _rank(fp8_dirs[1], 0)
    for layer in range(hf.config.num_hidden_layers):
        hf_prefix, prefix = f"model.layers.{layer}.", f"transformer.layers.{layer}."
        originals = {
            "attention.qkv": torch.cat([state[hf_prefix + f"self_attn.{p}_proj.weight"] for p in "qkv"]),
            "attention.dense": state[hf_prefix + "self_attn.o_proj.weight"],
            "mlp.fc": state[hf_prefix + "mlp.gate_proj.weight"], "mlp.gate": state[hf_prefix + "mlp.up_proj.weight"],
            "mlp.proj": state[hf_prefix + "mlp.down_proj.weight"]}
        for linear, original in originals.items():
            scale = tensors[f"{prefix}{linear}.weights_scaling_factor"]
            if linear not in ("mlp.fc", "mlp.gate"):  # those two share the larger of their scales
                assert scale.item() == pytest.approx(original.abs().max().item() / FP8_MAX, rel=1e-6)
            error = (tensors[f"{prefix}{linear}.weight"].float() * scale - original).abs().max()
            assert error <= 16 * scale.item() * (1 + 1e-6)  # e4m3's step is 32 in the top binade [256, 448]
        assert torch.equal(tensors[f"{prefix}mlp.fc.weights_scaling_factor"],
                           tensors[f"{prefix}mlp.gate.weights_scaling_factor"])


# ---- the native runtime -----------------------------------------------------------------------
def _logits(path, tokens: list[int]) -> torch.Tensor:
    from llmserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from llmserve.engine.engine import Engine
    from llmserve.models.loader import load_model

    config, model = load_model(path)
    engine = Engine(model, config, EngineConfig(model="in-memory", cache=CacheConfig(block_size=4, num_blocks=64),
                                                scheduler=SchedulerConfig(max_num_batched_tokens=256)))
    with torch.no_grad():
        return model.compute_logits(prefill_hidden(engine, tokens))


@pytest.mark.parametrize("quantization, bound", [("fp8", 0.1), ("int8-sq", 0.1)])
def test_a_quantized_checkpoint_runs_close_to_float32_and_alike_at_any_split(source, quantized_dirs, quantization,
                                                                              bound, tokenizer):
    hf, _, _ = source
    dirs = quantized_dirs(quantization)
    tokens = tokenizer.encode(TEXTS[0])
    with torch.no_grad():
        want = hf(torch.tensor([tokens])).logits[0]
    got = _logits(dirs[1], tokens)
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < bound, f"{quantization} logits relative error {error}"
    # the tp=2 shards (and their split scales) merge back into the tp=1 tensors exactly
    assert torch.equal(_logits(dirs[2], tokens), got)


def test_fp8_linear_on_cpu_is_the_dequantized_product():
    generator = torch.Generator().manual_seed(0)
    linear = Fp8Linear(32, 48)
    weight = torch.randn(48, 32, generator=generator)
    linear.weight_scale.copy_(fp8_scale(weight.abs().max()))
    linear.weight.copy_(quantize_fp8(weight, linear.weight_scale))
    x = torch.randn(5, 32, generator=generator) * 3
    linear.input_scale.copy_(fp8_scale(2.0))  # inputs above 2 saturate
    x_deq = quantize_fp8(x, linear.input_scale).float() * linear.input_scale
    assert x_deq.abs().max().item() == pytest.approx(2.0)
    assert torch.equal(linear(x), x_deq @ (linear.weight.float() * linear.weight_scale).t())


@pytest.mark.skipif(not (torch.cuda.is_available() and fp8_gemm_supported(torch.device("cuda"))),
                    reason="needs a GPU with FP8 tensor cores (compute capability 8.9+)")
@pytest.mark.parametrize("rows", [1, 7, 16, 300])
def test_fp8_gemm_on_cuda_matches_the_cpu_path(rows):
    generator = torch.Generator().manual_seed(1)
    linear = Fp8Linear(256, 512)
    weight = torch.randn(512, 256, generator=generator)
    linear.weight_scale.copy_(fp8_scale(weight.abs().max()))
    linear.weight.copy_(quantize_fp8(weight, linear.weight_scale))
    linear.input_scale.copy_(fp8_scale(4.0))
    x = torch.randn(rows, 256, generator=generator).bfloat16()
    want = linear(x.float())
    got = linear.cuda()(x.cuda()).float().cpu()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton kernel)")
def test_the_triton_quantizer_rounds_like_torch():
    x = torch.randn(4099, generator=torch.Generator().manual_seed(2)) * 30  # some saturate
    scale = fp8_scale(100.0)
    want = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    got = quantize_fp8(x.cuda(), scale.cuda()).cpu()
    assert got.dtype == FP8_DTYPE and torch.equal(got.view(torch.uint8), want.view(torch.uint8))


# ---- calibration and refusals -------------------------------------------------------------------
def test_sharegpt_calibration_never_uses_held_out_text(monkeypatch, tokenizer):
    from llmserve.evaluate.perplexity import is_heldout

    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"question {i} " * 5},
                                                 {"from": "gpt", "value": f"answer {i} " * 5}]} for i in range(60)]
    monkeypatch.setattr("llmserve.bench.sharegpt.load_conversations", lambda path=None: records)
    texts = calibration_texts(CalibrationConfig("sharegpt", size=100, seq_len=64), tokenizer)
    held_out = [r for r in records if is_heldout(r)]
    assert held_out and len(texts) == len(records) - len(held_out)
    decoded = {tokenizer.decode(ids) for ids in texts}
    assert not any(f"question {r['id'][1:]} " in text for r in held_out for text in decoded)


@pytest.mark.parametrize("kwargs, message", [
    (dict(dataset="c4"), "sharegpt or jsonl"), (dict(size=0), "calib-size"), (dict(seq_len=4), "calib-seq-len")])
def test_bad_calibration_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CalibrationConfig(**kwargs)


def test_a_bad_calibration_file_names_its_line(tmp_path, tokenizer):
    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(ValueError, match=r"calib.jsonl:2: not JSON"):
        calibration_texts(CalibrationConfig(f"jsonl:{path}", size=4, seq_len=64), tokenizer)


def test_unknown_quantization_is_refused_before_writing(source, tmp_path):
    _, path, _ = source
    with pytest.raises(ValueError, match="quantization must be one of"):
        convert_quantized(path, tmp_path / "out", "int4", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("quantization, message", [
    ({"quant_algo": "W4A8_AWQ"}, "W4A8_AWQ are not supported"), ({"quant_algo": "FP8", "kv_cache_quant_algo": "INT8"},
                                                          "kv_cache_quant_algo INT8")])
def test_checkpoints_quantized_otherwise_are_refused(quantization, message):
    with pytest.raises(UnsupportedModelError, match=message):
        check_trtllm_config({"architecture": "LlamaForCausalLM", "quantization": quantization})


def test_an_fp8_checkpoint_refuses_the_int8_shortcut(fp8_dirs):
    from llmserve.models.loader import load_model

    with pytest.raises(ValueError, match="quantized already"):
        load_model(fp8_dirs[1], quantization="int8")


def test_a_build_casting_an_fp8_checkpoint_keeps_its_fp8_weights_and_scales(fp8_dirs, tmp_path):
    from llmserve.build.native import _copy_converted
    from llmserve.checkpoint.trtllm_format import TrtllmCheckpoint

    copied = _copy_converted(TrtllmCheckpoint(fp8_dirs[1]), tmp_path / "bf16", "bfloat16")
    before, after = _rank(fp8_dirs[1], 0), _rank(copied, 0)
    for name, tensor in after.items():
        if before[name].dtype == torch.float32 and not name.endswith("scaling_factor"):
            assert tensor.dtype == torch.bfloat16, name
        else:
            assert torch.equal(tensor.view(torch.uint8) if tensor.dtype == FP8_DTYPE else tensor,
                               before[name].view(torch.uint8) if tensor.dtype == FP8_DTYPE else before[name]), name
    assert json.loads((copied / "config.json").read_text())["quantization"]["quant_algo"] == "FP8"


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["fp8", "int8-sq"])
def test_a_quantized_checkpoint_runs_at_tp2_like_at_tp1(quantized_dirs, quantization, tokenizer):
    """Each tensor rank loads its own quantized shard (row-parallel dense/proj included) and the ranks
    agree with one process on the tp=1 conversion."""
    from llmserve.llm import LLM
    from llmserve.sampling_params import SamplingParams

    dirs = quantized_dirs(quantization)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
    prompts = [tokenizer.encode(text) for text in TEXTS[:3]]
    with LLM(str(dirs[1])) as llm:
        want = [r.outputs[0] for r in llm.generate(prompts, params)]
    with LLM(str(dirs[2]), tensor_parallel_size=2) as llm:
        got = [r.outputs[0] for r in llm.generate(prompts, params)]
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for a, b in zip(got, want):
        assert [t.logprob for t in a.logprobs] == pytest.approx([t.logprob for t in b.logprobs], abs=1e-3)


# ---- SmoothQuant ------------------------------------------------------------------------------
def test_smoothquant_tensors_have_tensorrt_llms_names_dtypes_and_shapes(source, sq_dirs):
    hf, _, _ = source
    cfg = hf.config
    config = json.loads((sq_dirs[2] / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL"
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    full = {"attention.qkv": (cfg.hidden_size + 2 * kv, cfg.hidden_size), "attention.dense": (cfg.hidden_size,) * 2,
            "mlp.fc": (cfg.intermediate_size, cfg.hidden_size), "mlp.gate": (cfg.intermediate_size, cfg.hidden_size),
            "mlp.proj": (cfg.hidden_size, cfg.intermediate_size)}
    for tp, path in sq_dirs.items():
        for rank in range(tp):
            tensors = _rank(path, rank)
            for linear, split in LINEARS.items():
                prefix = f"transformer.layers.1.{linear}"
                out, inp = full[linear]
                column = split == "column"
                assert tensors[f"{prefix}.weight"].dtype == torch.int8
                assert tuple(tensors[f"{prefix}.weight"].shape) == ((out // tp, inp) if column else (out, inp // tp))
                # column layers split their per-row weight scales, row layers their per-input prequant scales
                assert tuple(tensors[f"{prefix}.weights_scaling_factor"].shape) == ((out // tp,) if column else (out,))
                assert tuple(tensors[f"{prefix}.prequant_scaling_factor"].shape) == ((inp,) if column else (inp // tp,))
                assert tuple(tensors[f"{prefix}.activation_scaling_factor"].shape) == (1,)
                assert tensors[f"{prefix}.weights_scaling_factor"].dtype == torch.float32


def test_smoothquant_weights_dequantize_to_the_originals_within_half_a_step(source, sq_dirs):
    hf, _, _ = source
    state, tensors = hf.state_dict(), _rank(sq_dirs[1], 0)
    original = state["model.layers.0.self_attn.o_proj.weight"]
    prefix = "transformer.layers.0.attention.dense"
    step = tensors[f"{prefix}.weights_scaling_factor"][:, None] * tensors[f"{prefix}.prequant_scaling_factor"][None, :]
    error = (tensors[f"{prefix}.weight"].float() * step - original).abs()
    assert (error <= 0.5 * step * (1 + 1e-5) + 1e-7).all()


def test_smoothing_beats_plain_w8a8_on_outlier_channels():
    """SmoothQuant's claim, on one linear: inputs with a few large channels lose less when smoothed."""
    from llmserve.ops.int8_sq_linear import Int8SqLinear
    from llmserve.quantization.int8_sq import smooth_quantize

    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(64, 128, generator=generator) * 0.05
    x = torch.randn(256, 128, generator=generator)
    x[:, :4] *= 60  # outlier channels, as LLM activations have
    want = x @ weight.t()
    errors = {}
    for alpha in (0.0, 0.5):
        quantized = smooth_quantize(weight, x.abs().amax(dim=0), alpha)
        linear = Int8SqLinear(128, 64)
        linear.weight.copy_(quantized["weight"])
        linear.weight_scale.copy_(quantized["weights_scaling_factor"])
        linear.input_scale.copy_(quantized["activation_scaling_factor"])
        linear.prequant_scale.copy_(quantized["prequant_scaling_factor"])
        errors[alpha] = ((linear(x) - want).norm() / want.norm()).item()
    assert errors[0.5] < 0.5 * errors[0.0], errors


def _random_int8_linear(in_features: int, out_features: int, input_scale: float, generator: torch.Generator):
    from llmserve.ops.int8_sq_linear import Int8SqLinear

    linear = Int8SqLinear(in_features, out_features)
    linear.weight.copy_(torch.randint(-127, 128, (out_features, in_features), generator=generator, dtype=torch.int8))
    linear.weight_scale.copy_(torch.rand(out_features, generator=generator) * 0.01)
    linear.input_scale.fill_(input_scale)
    linear.prequant_scale.copy_(torch.rand(in_features, generator=generator) + 0.5)
    return linear


def test_int8_linear_is_the_exact_integer_product():
    from llmserve.ops.int8_sq_linear import quantize_int8

    generator = torch.Generator().manual_seed(5)
    linear = _random_int8_linear(32, 16, 0.02, generator)
    x = torch.randn(3, 32, generator=generator)
    x_int = quantize_int8(x * linear.prequant_scale, linear.input_scale).long()
    want = (x_int @ linear.weight.long().t()).double() * (0.02 * linear.weight_scale.double())
    assert torch.allclose(linear(x).double(), want, rtol=1e-5, atol=1e-7)


def test_smoothquant_alpha_out_of_range_is_refused(source, tmp_path):
    _, path, calibration = source
    with pytest.raises(ValueError, match="smoothquant-alpha"):
        convert_quantized(path, tmp_path / "out", "int8-sq", calibration=calibration, smoothquant_alpha=1.5,
                          progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton kernel, torch._int_mm)")
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_int8_linear_on_cuda_matches_the_cpu_path(rows):
    from llmserve.ops.int8_sq_linear import smooth_quantize_input

    generator = torch.Generator().manual_seed(6)
    linear = _random_int8_linear(256, 512, 0.03, generator)
    x = torch.randn(rows, 256, generator=generator).bfloat16()
    quantized = smooth_quantize_input(x.float(), linear.prequant_scale, linear.input_scale)
    on_gpu = smooth_quantize_input(x.cuda().float().contiguous(), linear.prequant_scale.cuda(), linear.input_scale.cuda())
    assert torch.equal(on_gpu.cpu(), quantized)  # the Triton kernel rounds like torch (ties to even)
    want = linear(x.float())
    got = linear.cuda()(x.cuda()).float().cpu()
    assert ((got - want).norm() / want.norm()).item() < 1e-2
