"""Build a native model from a HuggingFace or converted TensorRT-LLM checkpoint directory."""

from __future__ import annotations

from pathlib import Path

import torch

from llmserve.checkpoint.model_config import ModelConfig
from llmserve.models.llama import LlamaForCausalLM, RotaryEmbedding
from llmserve.ops.attention import REFERENCE_BACKEND, select_attention

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def open_checkpoint(path: str | Path):
    """The checkpoint reader for `path`: TrtllmCheckpoint if converted, else HFCheckpoint."""
    from llmserve.checkpoint.trtllm_format import TrtllmCheckpoint, is_trtllm_checkpoint

    if is_trtllm_checkpoint(path):
        return TrtllmCheckpoint(path)
    from llmserve.checkpoint.hf import HFCheckpoint

    return HFCheckpoint(path)


def checkpoint_tensors(checkpoint):
    """tp=1 TensorRT-LLM-named tensors of either checkpoint kind."""
    if hasattr(checkpoint, "merged_tensors"):
        return checkpoint.merged_tensors()
    return checkpoint.trtllm_tensors()


def build_model(config: ModelConfig, device: str | torch.device, dtype: str,
                reference_attention: bool = False) -> LlamaForCausalLM:
    """An uninitialised model on `device` (no time wasted on random init)."""
    backend = REFERENCE_BACKEND if reference_attention else select_attention(device)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, backend)
    model = model.to_empty(device=device).to(DTYPES[dtype])
    model.transformer.rotary = RotaryEmbedding(config).to(device)  # tables stay float32
    return model.eval()


def load_model(path: str | Path, device: str = "cpu", dtype: str = "float32",
               quantization: str | None = None) -> tuple[ModelConfig, LlamaForCausalLM]:
    """Read the checkpoint at `path` into a native model on `device`."""
    checkpoint = open_checkpoint(path)
    model = build_model(checkpoint.config, device, dtype)
    model.load_weights(checkpoint_tensors(checkpoint))
    if quantization == "int8":
        from llmserve.ops.int8_linear import quantize_linears_int8

        quantize_linears_int8(model)
    return checkpoint.config, model
