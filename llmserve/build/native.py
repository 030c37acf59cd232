"""The native backend's build: the checkpoint converted/cast to the profile's dtype and mapping, then checked.

When nothing would change (an HF checkpoint already in the profile's dtype at tp=pp=1, or a converted
one at the profile's dtype), the source files are hard-linked instead of rewritten: the native runtime
reads both layouts, and a build of the default model then costs no second copy of its 651 MB.

The profile itself (max batch, max tokens, max length, KV block size) travels in the engine's manifest;
`repository.load_engine_config` turns it back into EngineConfig overrides at serve time.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from llmserve.build.profile import BuildProfile
from llmserve.checkpoint import names
from llmserve.checkpoint.convert import (
    DTYPES,
    convert_checkpoint,
    copy_tokenizer_files,
    heads_per_rank,
    num_rank_tensors,
    save_rank_file,
)
from llmserve.checkpoint.hf import HFCheckpoint
from llmserve.checkpoint.trtllm_format import TrtllmCheckpoint, is_trtllm_checkpoint

SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def build_native(checkpoint_dir: str | Path, profile: BuildProfile, out_dir: str | Path) -> Path:
    """Write `out_dir/checkpoint/` (TensorRT-LLM layout, profile dtype/tp/pp) and verify it; return it."""
    target = prepare_checkpoint(checkpoint_dir, profile, Path(out_dir) / "checkpoint")
    verify_checkpoint(target, profile)
    return target


def prepare_checkpoint(src: str | Path, profile: BuildProfile, dest: str | Path) -> Path:
    """A TensorRT-LLM checkpoint of `src` at the profile's dtype and tp/pp, written into `dest`.

    An HF checkpoint goes through `convert_checkpoint`, or is linked as is when the conversion would only
    rename tensors (tp=pp=1, weights already in the profile's dtype). A converted one is copied (cast rank
    by rank when its dtype differs); re-sharding a converted checkpoint is refused: convert again from the
    HF source.
    """
    if not is_trtllm_checkpoint(src):
        if hf_matches_profile(src, profile):
            return _link_hf(Path(src), Path(dest))
        return convert_checkpoint(src, dest, tp_size=profile.tp_size, pp_size=profile.pp_size,
                                  dtype=profile.dtype, progress=False)
    source = TrtllmCheckpoint(src)
    have = (source.mapping.tp_size, source.mapping.pp_size)
    if have != (profile.tp_size, profile.pp_size):
        raise ValueError(f"{src} is a converted checkpoint with tp={have[0]} pp={have[1]}, but profile "
                         f"{profile.name!r} wants tp={profile.tp_size} pp={profile.pp_size}; build from the "
                         f"HuggingFace checkpoint, or convert again with `llmserve convert --tp "
                         f"{profile.tp_size} --pp {profile.pp_size}`")
    return _copy_converted(source, Path(dest), profile.dtype)


def matches_profile(src: str | Path, profile: BuildProfile) -> bool:
    """True when `src` is a converted checkpoint already at the profile's dtype, tp and pp."""
    if not is_trtllm_checkpoint(src):
        return False
    config = json.loads((Path(src) / "config.json").read_text())
    mapping = config.get("mapping", {})
    return (config.get("dtype"), mapping.get("tp_size", 1), mapping.get("pp_size", 1)) == (
        profile.dtype, profile.tp_size, profile.pp_size)


def hf_matches_profile(src: str | Path, profile: BuildProfile) -> bool:
    """True when the HF checkpoint at `src` needs no conversion for `profile`: one rank, and every
    floating-point weight already stored in the profile's dtype."""
    if (profile.tp_size, profile.pp_size) != (1, 1):
        return False
    checkpoint = HFCheckpoint(src)  # also refuses unsupported models and stray tensors
    want = SAFETENSORS_DTYPES[profile.dtype]
    for file in checkpoint.files():
        with safe_open(file, framework="pt") as weights:
            if any(weights.get_slice(name).get_dtype() != want for name in weights.keys()):  # noqa: SIM118
                return False
    return True


def _link_hf(src: Path, dest: Path) -> Path:
    """The HF checkpoint's weights, config and tokenizer files, hard-linked into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.safetensors")) + sorted(src.glob("*.safetensors.index.json")):
        link_or_copy(path, dest / path.name)
    link_or_copy(src / "config.json", dest / "config.json")
    copy_tokenizer_files(src, dest)
    return dest


def _copy_converted(source: TrtllmCheckpoint, dest: Path, dtype: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((source.path / "config.json").read_text())
    for rank in range(source.mapping.world_size):
        if config.get("dtype") == dtype:
            link_or_copy(source.rank_path(rank), dest / source.rank_path(rank).name)
            continue
        # only tensors in the checkpoint's dtype: quantized weights and the float32 weight and activation
        # scales of a quantized checkpoint stay as they are (its prequant scales are in the model dtype)
        stored = DTYPES.get(config.get("dtype"))
        float32_scales = (names.WEIGHT_SCALE, names.INPUT_SCALE)
        shard = {name: t.to(DTYPES[dtype]) if t.dtype == stored and not name.endswith(float32_scales) else t
                 for name, t in load_file(source.rank_path(rank)).items()}
        save_rank_file(shard, dest / source.rank_path(rank).name)
        del shard  # one rank in memory at a time
    (dest / "config.json").write_text(json.dumps({**config, "dtype": dtype}, indent=2))
    copy_tokenizer_files(source.path, dest)
    return dest


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link an unchanged shard into the engine (no copy of gigabytes); copy across filesystems.

    The link shares its bytes with the source, which is safe because nothing writes a linked file in
    place: the builder only creates new files, and conversions and builds publish whole new folders
    (`atomic_dir.staged_dir`), so the source never changes through the engine or the engine through it.
    A linked shard keeps the source's mode (it is the same file); a copy gets the umask's.
    """
    try:
        os.link(src, dest)
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(src, dest)


def verify_checkpoint(path: str | Path, profile: BuildProfile) -> None:
    """Cheap checks from headers only: config readable, every rank file present and complete, key shapes.

    A linked HF checkpoint was checked by `hf_matches_profile` (names and dtypes) before it was linked.
    """
    if not is_trtllm_checkpoint(path):
        HFCheckpoint(path)
        return
    checkpoint = TrtllmCheckpoint(path)  # reads config.json, raises when a rank file is missing
    config, mapping = checkpoint.config, checkpoint.mapping
    if (mapping.tp_size, mapping.pp_size) != (profile.tp_size, profile.pp_size):
        raise ValueError(f"{path} has tp={mapping.tp_size} pp={mapping.pp_size}, profile wants "
                         f"tp={profile.tp_size} pp={profile.pp_size}")
    q_heads, kv_heads = heads_per_rank(config, mapping.tp_size)
    qkv_rows = (q_heads + 2 * kv_heads) * config.head_dim
    for rank in range(mapping.world_size):
        with safe_open(checkpoint.rank_path(rank), framework="pt") as shard:
            expected = num_rank_tensors(config, mapping, rank)
            if len(shard.keys()) != expected:
                raise ValueError(f"rank{rank}.safetensors holds {len(shard.keys())} tensors, expected {expected}")
            if mapping.pp_rank(rank) == 0:
                _expect(shard, names.TRT_EMBEDDING, [config.vocab_size, config.hidden_size], rank)
            _expect(shard, names.trt_layer(0, names.QKV_TRT), [qkv_rows, config.hidden_size], rank)


def _expect(shard, name: str, shape: list[int], rank: int) -> None:
    if name not in shard.keys():  # noqa: SIM118 (safe_open has keys(), no __contains__)
        raise ValueError(f"rank{rank}.safetensors lacks {name}")
    actual = list(shard.get_slice(name).get_shape())
    if actual != shape:
        raise ValueError(f"rank{rank}.safetensors: {name} has shape {actual}, expected {shape}")
