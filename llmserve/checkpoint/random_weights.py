"""A weightless checkpoint for benchmarks: an HF `config.json` and a `RANDOM_WEIGHTS` marker, no tensors.

Each tensor is drawn when asked for, from a generator seeded by the seed and the tensor's name, so
every rank of any tp x pp split sees the same whole model (a rank draws the whole tensor and keeps its
slice, through the converter's own split rules): a llama-70b shape can be benchmarked without 140 GB of
files, and tp=2 can be compared with tp=1 token for token. Not for serving anything real.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Iterator

import torch

from llmserve.checkpoint import names
from llmserve.checkpoint.model_config import ModelConfig

MARKER = "RANDOM_WEIGHTS"
STD = 0.02


def is_random_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file() and (Path(path) / "config.json").is_file()


def write_random_checkpoint(path: str | Path, hf_config: dict, seed: int = 0) -> Path:
    """A folder that `RandomCheckpoint` reads: the HF config and the seed."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    (path / MARKER).write_text(f"{seed}\n")
    return path


class RandomCheckpoint:
    """HFCheckpoint's interface (`config`, `get`, `trtllm_tensors`) over drawn weights."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        self.path = Path(path)
        self.config = ModelConfig.from_hf(json.loads((self.path / "config.json").read_text()))
        self.seed = int((self.path / MARKER).read_text().split()[0])
        self.device = torch.device(device)

    def shape(self, name: str) -> tuple[int, ...]:
        c = self.config
        q, kv, e, i = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.hidden_size, \
            c.intermediate_size
        if name in (names.HF_EMBEDDING, names.HF_LM_HEAD):
            return c.vocab_size, e
        suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        shapes = {"self_attn.q_proj.weight": (q, e), "self_attn.k_proj.weight": (kv, e),
                  "self_attn.v_proj.weight": (kv, e), "self_attn.o_proj.weight": (e, q),
                  "mlp.gate_proj.weight": (i, e), "mlp.up_proj.weight": (i, e), "mlp.down_proj.weight": (e, i),
                  "input_layernorm.weight": (e,), "post_attention_layernorm.weight": (e,), names.HF_FINAL_NORM: (e,)}
        if suffix not in shapes:
            raise KeyError(f"a random checkpoint has no tensor {name!r}")
        return shapes[suffix]

    def get(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        if len(shape) == 1:
            return torch.ones(shape, device=self.device)  # norms: the identity scale
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=generator, device=self.device).mul_(STD)

    def trtllm_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        c = self.config
        return names.hf_to_trtllm_single_rank(self.get, c.num_hidden_layers, c.tie_word_embeddings, c.attn_bias)
