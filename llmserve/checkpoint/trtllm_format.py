"""Read a TensorRT-LLM unified checkpoint: `config.json` plus `rank{N}.safetensors` shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llmserve.checkpoint import names
from llmserve.checkpoint.architectures import UnsupportedModelError
from llmserve.checkpoint.convert import Mapping, heads_per_rank, rank_tensor_names
from llmserve.checkpoint.hf import shown
from llmserve.checkpoint.model_config import ModelConfig
from llmserve.checkpoint.names import Split


def is_trtllm_checkpoint(path: str | Path) -> bool:
    """True when `path` holds a TensorRT-LLM config (it has a `mapping`) and its rank0 shard."""
    config_path = Path(path) / "config.json"
    if not (config_path.is_file() and (Path(path) / "rank0.safetensors").is_file()):
        return False
    return "mapping" in json.loads(config_path.read_text())


class TrtllmCheckpoint:
    """A converted checkpoint directory; shards are read lazily, one tensor at a time."""

    def __init__(self, path: str | Path, check_ranks: list[int] | None = None) -> None:
        """`check_ranks`: the shards whose tensor names are checked now (default: all; a parallel rank
        reads only its own)."""
        self.path = Path(path)
        raw = json.loads((self.path / "config.json").read_text())
        self.config = ModelConfig.from_trtllm(raw)
        self.mapping = Mapping(raw["mapping"].get("tp_size", 1), raw["mapping"].get("pp_size", 1))
        missing = [p.name for p in map(self.rank_path, range(self.mapping.world_size)) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.path} lacks rank shards {missing} for mapping {self.mapping}")
        for rank in range(self.mapping.world_size) if check_ranks is None else check_ranks:
            self._check_tensor_names(rank)

    def rank_path(self, rank: int) -> Path:
        return self.path / f"rank{rank}.safetensors"

    def _check_tensor_names(self, rank: int) -> None:
        """Raise when rank `rank`'s file holds tensors the model would not use, or lacks ones it needs."""
        try:
            with safe_open(self.rank_path(rank), framework="pt") as shard:
                held = set(shard.keys())
        except Exception as exc:  # safetensors' own messages do not name the file
            raise ValueError(f"{self.rank_path(rank)} is not a readable safetensors file: {exc}") from None
        wanted = rank_tensor_names(self.config, self.mapping, rank)
        unused = sorted(held - set(wanted))
        if unused:
            raise UnsupportedModelError(
                f"{self.rank_path(rank)} holds {len(unused)} tensors that {self.config.architecture} as configured "
                f"would not use ({shown(unused)}); llmserve refuses rather than drop weights")
        missing = [name for name in wanted if name not in held]
        if missing:
            raise ValueError(f"{self.rank_path(rank)} holds {len(wanted) - len(missing)} of the {len(wanted)} tensors "
                             f"the model needs; missing: {shown(missing)}")

    def rank_tensors(self, rank: int) -> dict[str, torch.Tensor]:
        """All tensors of rank `rank`, as stored (local layer numbering)."""
        return load_file(self.rank_path(rank))

    def iter_rank_tensors(self, rank: int) -> Iterator[tuple[str, torch.Tensor]]:
        """The same, one tensor at a time (a rank loading its shard holds one copy, not two)."""
        with safe_open(self.rank_path(rank), framework="pt") as shard:
            for name in shard.keys():
                yield name, shard.get_tensor(name)

    def merged_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the tp=1, pp=1 tensors, in the names and order of `names.hf_to_trtllm_single_rank`."""
        mapping, config = self.mapping, self.config
        shards = [safe_open(self.rank_path(r), framework="pt") for r in range(mapping.world_size)]

        def stage(pp_rank: int) -> list[Callable[[str], torch.Tensor]]:
            return [shards[mapping.rank(t, pp_rank)].get_tensor for t in range(mapping.tp_size)]

        yield names.TRT_EMBEDDING, stage(0)[0](names.TRT_EMBEDDING)
        for pp_rank in range(mapping.pp_size):
            gets = stage(pp_rank)
            for local, layer in enumerate(mapping.pp_layers(pp_rank, config.num_hidden_layers)):
                for trt_suffix, split in names.LAYER_WEIGHTS.values():
                    parts = [get(names.trt_layer(local, trt_suffix)) for get in gets]
                    yield names.trt_layer(layer, trt_suffix), MERGERS[split](parts)
                    yield from self._scales(gets, local, layer, trt_suffix)
                qkv_suffixes = [names.QKV_TRT, *((names.QKV_BIAS_TRT,) if config.attn_bias else ())]
                for suffix in qkv_suffixes:
                    parts = [get(names.trt_layer(local, suffix)) for get in gets]
                    yield names.trt_layer(layer, suffix), self._merge_qkv_weight(parts)
                    yield from self._scales(gets, local, layer, suffix)
        last = stage(mapping.pp_size - 1)
        yield names.TRT_FINAL_NORM, last[0](names.TRT_FINAL_NORM)
        yield names.TRT_LM_HEAD, merge_lm_head([get(names.TRT_LM_HEAD) for get in last], config.vocab_size)


    def _merge_qkv_weight(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if self.config.quant_algo not in names.PACKED_INT4_ALGOS:
            return merge_qkv(parts, self.config)
        from llmserve.ops.weight_only_linear import pack_int4, unpack_int4  # rows are packed in pairs

        return pack_int4(merge_qkv([unpack_int4(part) for part in parts], self.config))

    def _scales(self, gets: list[Callable[[str], torch.Tensor]], local: int, layer: int,
                trt_suffix: str) -> Iterator[tuple[str, torch.Tensor]]:
        """A quantized linear's scales merged over the tensor ranks: per-tensor ones are the same on every
        rank; per-channel ones are split with the dimension they scale (see `merge_scale`)."""
        linear = trt_suffix.removesuffix(".weight")
        for suffix in names.quant_scale_suffixes(linear, self.config.quant_algo):
            parts = [get(names.trt_layer(local, suffix)) for get in gets]
            yield names.trt_layer(layer, suffix), merge_scale(parts, linear, suffix, self.config)


def merge_scale(parts: list[torch.Tensor], linear: str, suffix: str, config: ModelConfig) -> torch.Tensor:
    """Inverse of the converter's split of one scale tensor: a per-output-channel weight scale of a column
    layer, the group scales of a row layer (by input) and a per-input-channel prequant scale of a row
    layer are split; anything else is replicated."""
    column = linear not in names.ROW_PARALLEL_LINEARS
    if suffix.endswith(names.WEIGHT_SCALE) and column and parts[0].numel() > 1:
        return merge_qkv(parts, config) if linear == "attention.qkv" else torch.cat(parts)
    if suffix.endswith(names.WEIGHT_SCALE) and parts[0].dim() == 2:  # group scales [out, in / group]
        return torch.cat(parts, dim=1)
    if suffix.endswith(names.PREQUANT_SCALE) and not column:
        return torch.cat(parts)
    return parts[0]


def merge_qkv(parts: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """Inverse of `convert.split_qkv` over all TP ranks: [q; k; v] with KV duplicates dropped."""
    tp_size = len(parts)
    q_heads, kv_heads = heads_per_rank(config, tp_size)
    sizes = [q_heads * config.head_dim, kv_heads * config.head_dim, kv_heads * config.head_dim]
    qs, ks, vs = zip(*(part.split(sizes, dim=0) for part in parts))
    # With fewer KV heads than ranks, each KV head sits on tp/kv consecutive ranks; keep one.
    step = max(1, tp_size // config.num_key_value_heads)
    return torch.cat([*qs, *ks[::step], *vs[::step]], dim=0)


def merge_lm_head(parts: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Inverse of `convert.pad_and_split_lm_head`: the rows concatenated, zero padding dropped."""
    return torch.cat(parts, dim=0)[:vocab_size]


MERGERS: dict[Split, Callable[[list[torch.Tensor]], torch.Tensor]] = {
    Split.REPLICATED: lambda parts: parts[0],
    Split.COLUMN: lambda parts: torch.cat(parts, dim=0),
    Split.ROW: lambda parts: torch.cat(parts, dim=1),
}
