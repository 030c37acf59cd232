"""Which HuggingFace architectures llmserve runs, and the refusal of everything it does not implement.

Every supported family is the LLaMA block (pre-norm RMSNorm, GPT-NeoX RoPE, GQA, SwiGLU);
they differ only in what `ArchitectureFeatures` records. A config feature we do not
implement is refused with a message, never ignored: ignoring it would serve wrong tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# HF `architectures[0]` -> its `model_type`.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
ARCHITECTURE_OF_MODEL_TYPE = {model_type: arch for arch, model_type in SUPPORTED_ARCHITECTURES.items()}
# Families whose q/k/v projections always carry a bias (Qwen2 has no config switch for it).
QKV_BIAS_FAMILIES = {"Qwen2ForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# TensorRT-LLM quantization algorithms the native runtime executes (`quantization.quant_algo`)
SUPPORTED_QUANT_ALGOS = ("FP8", "W8A8_SQ_PER_CHANNEL", "W8A16", "W4A16_AWQ")


class UnsupportedModelError(ValueError):
    """A checkpoint whose architecture, config feature or tensors llmserve does not implement."""


@dataclass(frozen=True, slots=True)
class ArchitectureFeatures:
    """What an accepted HF config asks of the LLaMA block."""

    architecture: str
    attn_bias: bool  # q/k/v projections have a bias
    max_position_embeddings: int  # capped to the sliding window, if any


def supported_list() -> str:
    return ", ".join(SUPPORTED_ARCHITECTURES)


def check_hf_config(hf: dict) -> ArchitectureFeatures:
    """The features of the HF config dict `hf`; raises UnsupportedModelError for anything not implemented."""
    architecture = _architecture(hf)
    _require(not hf.get("mlp_bias"), f"{architecture} with mlp_bias=true is not supported")
    _require(float(hf.get("partial_rotary_factor", 1.0)) == 1.0,
             f"partial_rotary_factor {hf.get('partial_rotary_factor')} is not supported (llmserve rotates whole heads)")
    quantization = hf.get("quantization_config")
    _require(not quantization, f"quantized checkpoints ({_quant_method(quantization)}) are not supported; "
             "use the unquantized model (llmserve quantizes at build time)")
    attn_bias = architecture in QKV_BIAS_FAMILIES
    if not attn_bias:
        _require(not hf.get("attention_bias"), f"{architecture} with attention_bias=true is not supported "
                 "(q/k/v biases are implemented for Qwen2ForCausalLM only)")
    return ArchitectureFeatures(architecture, attn_bias, _context_length(hf, architecture))


def check_trtllm_config(trt: dict) -> None:
    """Raise UnsupportedModelError when a TensorRT-LLM checkpoint config needs what we do not implement."""
    architecture = trt.get("architecture", "LlamaForCausalLM")
    _require(architecture in SUPPORTED_ARCHITECTURES,
             f"{architecture} is not supported; llmserve runs {supported_list()}")
    _require(trt.get("position_embedding_type", "rope_gpt_neox") == "rope_gpt_neox",
             f"position_embedding_type {trt.get('position_embedding_type')!r} is not supported (rope_gpt_neox only)")
    _require(not trt.get("mlp_bias"), f"{architecture} with mlp_bias=true is not supported")
    quantization = trt.get("quantization") or {}
    quant_algo = quantization.get("quant_algo")
    _require(quant_algo is None or quant_algo in SUPPORTED_QUANT_ALGOS,
             f"TensorRT-LLM checkpoints quantized with quant_algo {quant_algo} are not supported (llmserve runs "
             f"{', '.join(SUPPORTED_QUANT_ALGOS)} and unquantized ones)")
    _require(quant_algo is None or not trt.get("attn_bias"), f"quant_algo {quant_algo} with q/k/v biases is not supported")
    if quant_algo == "W4A16_AWQ":  # ModelOpt's AWQ export: symmetric int4 groups, prequant scales
        _require(isinstance(quantization.get("group_size"), int) and quantization["group_size"] > 0,
                 "quant_algo W4A16_AWQ needs a positive integer quantization.group_size")
        _require(not quantization.get("has_zero_point"), "W4A16_AWQ with zero points is not supported")
        _require(quantization.get("pre_quant_scale", True), "W4A16_AWQ without pre_quant_scale is not supported")
    kv_algo = quantization.get("kv_cache_quant_algo")
    _require(kv_algo is None, f"kv_cache_quant_algo {kv_algo} is not supported (serve with --kv-cache-dtype instead)")


def _architecture(hf: dict) -> str:
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if not isinstance(architectures, list):
        architectures = [architectures]
    architecture = architectures[0] if architectures else ARCHITECTURE_OF_MODEL_TYPE.get(model_type)
    if architecture not in SUPPORTED_ARCHITECTURES:
        name = architecture or "a model without 'architectures'"
        raise UnsupportedModelError(
            f"{name} (model_type {model_type}) is not supported; llmserve runs {supported_list()}")
    return architecture


def _context_length(hf: dict, architecture: str) -> int:
    """max_position_embeddings, capped to an active sliding window.

    Within the window a sliding-window model attends to every earlier token, so capping the
    context makes our full attention exact instead of silently wrong past the window.
    """
    max_positions = int(hf.get("max_position_embeddings", 2048))
    window = _sliding_window(hf)
    if window is None or window >= max_positions:
        return max_positions
    logger.warning("%s uses a sliding window of %d tokens: llmserve serves it with a context of at most %d tokens "
                   "(max_position_embeddings %d)", architecture, window, window, max_positions)
    return window


def _sliding_window(hf: dict) -> int | None:
    # Qwen2 carries a window that is off unless use_sliding_window; Mistral's is on when set.
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        return None
    window = hf.get("sliding_window")
    return int(window) if window else None


def _quant_method(quantization) -> str:
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    return f"quant_method {method}" if method else "quantization_config"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UnsupportedModelError(message)
