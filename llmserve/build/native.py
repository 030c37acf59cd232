"""The native backend's build: the checkpoint converted/cast to the profile's dtype and mapping, then checked."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from llmserve.build.profile import BuildProfile
from llmserve.checkpoint import names
from llmserve.checkpoint.convert import convert_checkpoint, heads_per_rank
from llmserve.checkpoint.trtllm_format import TrtllmCheckpoint


def build_native(checkpoint_dir: str | Path, profile: BuildProfile, out_dir: str | Path) -> Path:
    """Write `out_dir/checkpoint/` (TensorRT-LLM layout, profile dtype/tp/pp) and verify it; return it."""
    target = Path(out_dir) / "checkpoint"
    convert_checkpoint(checkpoint_dir, target, tp_size=profile.tp_size, pp_size=profile.pp_size,
                       dtype=profile.dtype, progress=False)
    verify_checkpoint(target, profile)
    return target


def verify_checkpoint(path: str | Path, profile: BuildProfile) -> None:
    """Cheap checks from headers only: config readable, every rank file present, key shapes as the config says."""
    checkpoint = TrtllmCheckpoint(path)  # reads config.json, raises when a rank file is missing
    config, mapping = checkpoint.config, checkpoint.mapping
    if (mapping.tp_size, mapping.pp_size) != (profile.tp_size, profile.pp_size):
        raise ValueError(f"{path} has tp={mapping.tp_size} pp={mapping.pp_size}, profile wants "
                         f"tp={profile.tp_size} pp={profile.pp_size}")
    q_heads, kv_heads = heads_per_rank(config, mapping.tp_size)
    qkv_rows = (q_heads + 2 * kv_heads) * config.head_dim
    for rank in range(mapping.world_size):
        with safe_open(checkpoint.rank_path(rank), framework="pt") as shard:
            if mapping.pp_rank(rank) == 0:
                _expect(shard, names.TRT_EMBEDDING, [config.vocab_size, config.hidden_size], rank)
            _expect(shard, names.trt_layer(0, names.QKV_TRT), [qkv_rows, config.hidden_size], rank)


def _expect(shard, name: str, shape: list[int], rank: int) -> None:
    if name not in shard.keys():  # noqa: SIM118 (safe_open has keys(), no __contains__)
        raise ValueError(f"rank{rank}.safetensors lacks {name}")
    actual = list(shard.get_slice(name).get_shape())
    if actual != shape:
        raise ValueError(f"rank{rank}.safetensors: {name} has shape {actual}, expected {shape}")
