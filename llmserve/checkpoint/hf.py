"""Lazy reader of a HuggingFace LLaMA-family checkpoint directory (safetensors, possibly sharded)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from llmserve.checkpoint.architectures import UnsupportedModelError
from llmserve.checkpoint.model_config import ModelConfig
from llmserve.checkpoint.names import hf_tensor_names, hf_to_trtllm_single_rank, is_ignored_hf_tensor

MAX_NAMES_SHOWN = 4


class HFCheckpoint:
    """Config plus one-tensor-at-a-time access to an HF checkpoint's weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = ModelConfig.from_hf(json.loads((self.path / "config.json").read_text()))
        self._merge_generation_eos()
        self._file_of = self._index_tensors()
        check_hf_tensor_names(self.path, self.config, self.names())

    def names(self) -> list[str]:
        return list(self._file_of)

    def files(self) -> list[Path]:
        """The safetensors files holding the weights."""
        return sorted(set(self._file_of.values()))

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        with safe_open(self._file_of[name], framework="pt") as f:
            return f.get_tensor(name)

    def trtllm_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The tp=1 TensorRT-LLM-named tensors, through the shared name map."""
        config = self.config
        return hf_to_trtllm_single_rank(self.get, config.num_hidden_layers, config.tie_word_embeddings,
                                        config.attn_bias)

    def _index_tensors(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.path / file for name, file in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            found = ", ".join(sorted(p.name for p in self.path.iterdir())) or "nothing"
            raise FileNotFoundError(
                f"{self.path} holds no *.safetensors weights (found: {found}); "
                "llmserve reads safetensors only — re-save the model with save_pretrained(safe_serialization=True)")
        file_of = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                file_of.update((name, file) for name in f.keys())  # noqa: SIM118 (safe_open is no dict)
        return file_of

    def _merge_generation_eos(self) -> None:
        # generation_config.json may list more end-of-turn ids than config.json.
        gen = self.path / "generation_config.json"
        if not gen.exists():
            return
        eos = json.loads(gen.read_text()).get("eos_token_id")
        extra = eos if isinstance(eos, list) else [] if eos is None else [eos]
        self.config.eos_token_id = list(dict.fromkeys(self.config.eos_token_id + extra))


def check_hf_tensor_names(path: Path, config: ModelConfig, names: list[str]) -> None:
    """Raise when the checkpoint holds tensors the model would not use, or lacks ones it needs."""
    wanted = hf_tensor_names(config.num_hidden_layers, config.tie_word_embeddings, config.attn_bias)
    unused = sorted(n for n in set(names) - wanted if not is_ignored_hf_tensor(n, config.tie_word_embeddings))
    if unused:
        raise UnsupportedModelError(
            f"{path} holds {len(unused)} tensors that {config.architecture} as configured would not use "
            f"({shown(unused)}); llmserve refuses rather than drop weights: check config.json "
            f"(e.g. attention_bias, mlp_bias, architectures)")
    missing = sorted(wanted - set(names))
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensors that {config.architecture} needs: {shown(missing)}")


def shown(names: list[str]) -> str:
    """The first few of `names`, comma-separated, with how many more there are."""
    more = len(names) - MAX_NAMES_SHOWN
    return ", ".join(names[:MAX_NAMES_SHOWN]) + (f" and {more} more" if more > 0 else "")
