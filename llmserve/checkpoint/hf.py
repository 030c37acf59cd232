"""Lazy reader of a HuggingFace LLaMA checkpoint directory (safetensors, possibly sharded)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from llmserve.checkpoint.model_config import ModelConfig
from llmserve.checkpoint.names import hf_to_trtllm_single_rank


class HFCheckpoint:
    """Config plus one-tensor-at-a-time access to an HF checkpoint's weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = ModelConfig.from_hf(json.loads((self.path / "config.json").read_text()))
        self._merge_generation_eos()
        self._file_of = self._index_tensors()

    def names(self) -> list[str]:
        return list(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        with safe_open(self._file_of[name], framework="pt") as f:
            return f.get_tensor(name)

    def trtllm_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The tp=1 TensorRT-LLM-named tensors, through the shared name map."""
        return hf_to_trtllm_single_rank(self.get, self.config.num_hidden_layers, self.config.tie_word_embeddings)

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
