"""The LLaMA-family shape, read from a HuggingFace or TensorRT-LLM `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llmserve.checkpoint.architectures import (SUPPORTED_ARCHITECTURES, SUPPORTED_ROPE_TYPES, UnsupportedModelError,
                                               check_hf_config, check_trtllm_config, supported_list)


@dataclass(slots=True)
class ModelConfig:
    """Sizes and hyper-parameters of one LLaMA-family model."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    architecture: str = "LlamaForCausalLM"
    attn_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    quant_algo: str | None = None  # TensorRT-LLM's `quantization.quant_algo` of a converted checkpoint
    quant_group_size: int | None = None  # its `quantization.group_size` (group-wise weight-only schemes)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} attention heads are not a multiple of "
                             f"{self.num_key_value_heads} KV heads")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(f"{self.architecture} is not supported; llmserve runs {supported_list()}")
        if self.hidden_act != "silu":
            raise UnsupportedModelError(f"hidden_act {self.hidden_act!r} is not supported (llmserve implements silu)")
        if self.rope_scaling is not None:
            self.rope_scaling = _with_rope_type(self.rope_scaling)
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(f"rope scaling type {self.rope_type!r} is not supported "
                                        f"(llmserve implements {', '.join(SUPPORTED_ROPE_TYPES)})")

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Build from a HuggingFace config dict; UnsupportedModelError for what llmserve does not run."""
        features = check_hf_config(hf)
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=_hf_rope_theta(hf),
            rope_scaling=_hf_rope_scaling(hf),
            max_position_embeddings=features.max_position_embeddings,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            hidden_act=hf.get("hidden_act", "silu"),
            architecture=features.architecture,
            attn_bias=features.attn_bias,
            dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_as_list(eos),
        )

    @classmethod
    def from_trtllm(cls, trt: dict) -> "ModelConfig":
        """Build from a TensorRT-LLM unified checkpoint `config.json`."""
        check_trtllm_config(trt)
        heads = trt["num_attention_heads"]
        return cls(
            vocab_size=trt["vocab_size"],
            hidden_size=trt["hidden_size"],
            intermediate_size=trt["intermediate_size"],
            num_hidden_layers=trt["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=trt.get("num_key_value_heads") or heads,
            head_dim=trt.get("head_size") or trt["hidden_size"] // heads,
            rms_norm_eps=trt.get("norm_epsilon", 1e-5),
            rope_theta=trt.get("rotary_base", 10000.0),
            rope_scaling=trt.get("rotary_scaling"),
            max_position_embeddings=trt.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(trt.get("tie_word_embeddings", False)),
            hidden_act=trt.get("hidden_act", "silu"),
            architecture=trt.get("architecture", "LlamaForCausalLM"),
            attn_bias=bool(trt.get("attn_bias", False)),
            dtype=trt.get("dtype", "float32"),
            bos_token_id=trt.get("bos_token_id"),
            eos_token_id=_as_list(trt.get("eos_token_id")),
            quant_algo=(trt.get("quantization") or {}).get("quant_algo"),
            quant_group_size=(trt.get("quantization") or {}).get("group_size"),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        """Read `config.json` of either format (a TRT-LLM one has a `mapping`)."""
        data = json.loads((Path(path) / "config.json").read_text())
        return cls.from_trtllm(data) if "mapping" in data else cls.from_hf(data)


def _hf_rope_theta(hf: dict) -> float:
    # transformers >= 5 nests rope settings in `rope_parameters`; older ones use top-level keys.
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _hf_rope_scaling(hf: dict) -> dict | None:
    """The rope scaling dict with `rope_type` set, or None for plain RoPE."""
    scaling = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    scaling.pop("rope_theta", None)
    return _with_rope_type(scaling)


def _with_rope_type(scaling: dict) -> dict | None:
    """`scaling` keyed by `rope_type` (TensorRT-LLM and older transformers say `type`); None for plain RoPE."""
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    return None if rope_type == "default" else {"rope_type": rope_type, **scaling}


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]
