"""Build a native model from a HuggingFace or converted TensorRT-LLM checkpoint directory."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from llmserve.checkpoint.model_config import ModelConfig
from llmserve.models.llama import LlamaForCausalLM, RotaryEmbedding
from llmserve.ops.attention import REFERENCE_BACKEND, select_attention

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def open_checkpoint(path: str | Path, device: str | torch.device = "cpu", rank: int | None = None):
    """The checkpoint reader for `path`: TrtllmCheckpoint if converted (only `rank`'s shard checked, when
    given), RandomCheckpoint for a benchmark's weightless folder (weights drawn on `device`), else HFCheckpoint."""
    from llmserve.checkpoint.random_weights import RandomCheckpoint, is_random_checkpoint
    from llmserve.checkpoint.trtllm_format import TrtllmCheckpoint, is_trtllm_checkpoint

    if is_random_checkpoint(path):
        return RandomCheckpoint(path, device)
    if is_trtllm_checkpoint(path):
        return TrtllmCheckpoint(path, check_ranks=None if rank is None else [rank])
    from llmserve.checkpoint.hf import HFCheckpoint

    return HFCheckpoint(path)


def checkpoint_tensors(checkpoint):
    """tp=1 TensorRT-LLM-named tensors of either checkpoint kind."""
    if hasattr(checkpoint, "merged_tensors"):
        return checkpoint.merged_tensors()
    return checkpoint.trtllm_tensors()


def build_model(config: ModelConfig, device: str | torch.device, dtype: str,
                reference_attention: bool = False, parallel=None) -> LlamaForCausalLM:
    """An uninitialised model (one rank's part of it, given `parallel`) on `device`; no time wasted on
    random init."""
    backend = REFERENCE_BACKEND if reference_attention else select_attention(device)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, backend, parallel)
    model = model.to_empty(device=device).to(DTYPES[dtype])
    model.transformer.rotary = RotaryEmbedding(config).to(device)  # tables stay float32
    if config.quant_algo is not None:
        from llmserve.quantization.runtime import scheme

        scheme(config.quant_algo).use_linears(model)
    return model.eval()


def load_tensors(model: LlamaForCausalLM, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load checkpoint tensors into `model`, quantized ones under the native modules' names."""
    if model.config.quant_algo is not None:
        from llmserve.quantization.runtime import scheme

        tensors = scheme(model.config.quant_algo).checkpoint_tensors(tensors)
    model.load_weights(tensors)


def load_model(path: str | Path, device: str = "cpu", dtype: str = "float32",
               quantization: str | None = None) -> tuple[ModelConfig, LlamaForCausalLM]:
    """Read the checkpoint at `path` into a native model on `device`."""
    checkpoint = open_checkpoint(path, device)
    model = build_model(checkpoint.config, device, dtype)
    if quantization == "int8" and checkpoint.config.quant_algo is not None:
        raise ValueError(f"{path} is quantized already ({checkpoint.config.quant_algo}): serve it without --quantization")
    load_tensors(model, checkpoint_tensors(checkpoint))
    _weight_only_head(model, device)
    if quantization == "int8":
        from llmserve.ops.int8_linear import quantize_linears_int8

        quantize_linears_int8(model)
    return checkpoint.config, model


def rank_tensors_of(path: str | Path, parallel, dtype: str) -> tuple[ModelConfig, Iterable[tuple[str, torch.Tensor]]]:
    """Rank `parallel.rank`'s tensors: its own `rank{r}.safetensors` from a checkpoint converted for this
    tp x pp, or converted now, one tensor at a time, from a HuggingFace (or random-weight) checkpoint."""
    from llmserve.checkpoint.convert import rank_tensors, validate_mapping

    mapping, rank = parallel.mapping, parallel.rank
    checkpoint = open_checkpoint(path, parallel.device, rank=rank)
    if hasattr(checkpoint, "mapping"):  # converted: this rank's shard as written
        if checkpoint.mapping != mapping:
            raise ValueError(f"{path} was converted for tp={checkpoint.mapping.tp_size} pp={checkpoint.mapping.pp_size}, "
                             f"not tp={mapping.tp_size} pp={mapping.pp_size}: convert the HuggingFace checkpoint again "
                             f"with --tp {mapping.tp_size} --pp {mapping.pp_size}, or serve the HuggingFace directory")
        return checkpoint.config, checkpoint.iter_rank_tensors(rank)
    validate_mapping(checkpoint.config, mapping)
    return checkpoint.config, rank_tensors(checkpoint.get, checkpoint.config, mapping, rank, DTYPES[dtype])


def load_rank_model(path: str | Path, parallel, device: str, dtype: str) -> tuple[ModelConfig, LlamaForCausalLM]:
    """Rank `parallel.rank`'s part of the model at `path`, on `device`."""
    config, tensors = rank_tensors_of(path, parallel, dtype)
    model = build_model(config, parallel.device if device.startswith("cuda") else device, dtype, parallel=parallel)
    load_tensors(model, tensors)
    _weight_only_head(model, device)
    return config, model


def _weight_only_head(model: LlamaForCausalLM, device: str) -> None:
    """On CPU a weight-only checkpoint's LM head runs as W8A16 too (see `weight_only.int8_lm_head`)."""
    if device == "cpu" and model.config.quant_algo in ("W8A16", "W4A16_AWQ") and model.parallel.is_last_stage:
        from llmserve.quantization.weight_only import int8_lm_head

        int8_lm_head(model)
