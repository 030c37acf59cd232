"""Build profiles, the engine repository, the build worker process and the trtllm-build command line."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from llmserve.build.native import build_native
from llmserve.build.profile import BuildProfile, load_profile
from llmserve.build.repository import (
    EngineRepository,
    TargetMismatchError,
    apply_overrides,
    check_target,
    checkpoint_hash,
    load_engine_config,
    read_manifest,
)
from llmserve.build.target import current_target, describe, library_versions
from llmserve.build.trtllm_build import (
    TrtllmUnavailableError,
    build_trtllm,
    missing_trtllm,
    trtllm_build_command,
)
from llmserve.build.worker import build_in_background, run_build
from llmserve.config import EngineConfig
from tests.conftest import make_hf_llama, prefill_hidden
from tests.test_model_parity import hf_logits

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "build_configs"
H100 = {"kind": "cuda", "compute_capability": "sm_90", "device_name": "NVIDIA H100"}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    hf_model = make_hf_llama(seed=3)
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    hf_model.save_pretrained(path)
    return hf_model, path


def tiny_profile(**overrides) -> BuildProfile:
    fields = {"name": "tiny-cpu", "backend": "native", "dtype": "float32", "max_batch_size": 8, "max_num_tokens": 128,
                  "max_seq_len": 256, "max_input_len": 128, "kv_block_size": 4}
    return BuildProfile(**{**fields, **overrides})


@pytest.mark.parametrize("overrides, message", [
    ({"backend": "onnx"}, "backend must be one of"),
    ({"dtype": "int4"}, "dtype must be one of"),
    ({"max_batch_size": 0}, "max_batch_size must be a positive integer"),
    ({"kv_block_size": 24}, "kv_block_size must be a power of two"),
    ({"max_input_len": 512}, "max_input_len (512) must not exceed max_seq_len (256)"),
    ({"gemm_plugin": "int3"}, "gemm_plugin must be one of"),
    ({"name": ""}, "profile name must be non-empty"),
    ({"device": "tpu"}, "device must be one of"),
    ({"backend": "trtllm", "device": "cpu"}, "backend trtllm builds for CUDA GPUs only"),
])
def test_profile_validation_messages(overrides, message):
    with pytest.raises(ValueError) as info:
        tiny_profile(**overrides)
    assert message in str(info.value)


def test_load_yaml_and_toml_agree(tmp_path):
    (tmp_path / "p.yaml").write_text("backend: trtllm\ndtype: bfloat16\nmax_batch_size: 32\nkv_block_size: 32\n")
    (tmp_path / "p.toml").write_text('backend = "trtllm"\ndtype = "bfloat16"\nmax_batch_size = 32\n'
                                     'kv_block_size = 32\n')
    from_yaml, from_toml = load_profile(tmp_path / "p.yaml"), load_profile(tmp_path / "p.toml")
    assert from_yaml == from_toml
    assert (from_yaml.name, from_yaml.backend, from_yaml.max_batch_size,
            from_yaml.kv_block_size) == ("p", "trtllm", 32, 32)


def test_unknown_profile_field_is_refused(tmp_path):
    (tmp_path / "bad.yaml").write_text("max_batch_sise: 4\n")
    with pytest.raises(ValueError, match="max_batch_sise"):
        load_profile(tmp_path / "bad.yaml")


def test_shipped_profiles_load():
    profiles = {p.stem: load_profile(p) for p in CONFIGS_DIR.glob("*.yaml")}
    assert set(profiles) == {"smollm2-cpu", "smollm2-cuda", "llama-3.1-8b-tp1", "llama-3.1-8b-tp2"}
    assert (profiles["smollm2-cpu"].backend, profiles["smollm2-cpu"].dtype) == ("native", "float32")
    assert (profiles["smollm2-cuda"].backend, profiles["smollm2-cuda"].dtype) == ("native", "bfloat16")
    assert {name: p.device for name, p in profiles.items()} == {
        "smollm2-cpu": "cpu", "smollm2-cuda": "cuda", "llama-3.1-8b-tp1": "cuda", "llama-3.1-8b-tp2": "cuda"}
    for tp in (1, 2):
        p = profiles[f"llama-3.1-8b-tp{tp}"]
        assert (p.backend, p.dtype, p.tp_size, p.max_batch_size, p.max_num_tokens, p.max_seq_len,
                p.kv_block_size, p.gemm_plugin) == ("trtllm", "bfloat16", tp, 256, 8192, 8192, 32, "auto")


def test_engine_overrides_apply_to_engine_config():
    config = apply_overrides(EngineConfig(), {**tiny_profile().engine_overrides(), "device": {"dtype": "float16"}})
    assert (config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens,
            config.scheduler.max_model_len, config.cache.block_size, config.device.dtype) == (8, 128, 256, 4, "float16")


def test_target_and_versions():
    assert current_target("cpu") == {"kind": "cpu"}
    assert describe(H100) == "CUDA sm_90 (NVIDIA H100)"
    assert {"torch", "transformers", "llmserve"} <= set(library_versions())


def test_checkpoint_hash_tracks_content_and_memoises(hf_dir, tmp_path):
    _, src = hf_dir
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in src.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    cache = tmp_path / "hashes.json"
    first = checkpoint_hash(copy, cache)
    assert first == checkpoint_hash(src)  # content, not path, decides
    memo = json.loads(cache.read_text())
    assert len(memo) == 2  # config.json and model.safetensors, one digest each
    # The memo is trusted for an untouched file: a forged digest changes the result, proving no rehash.
    weights_key = next(k for k in memo if "model.safetensors" in k)
    cache.write_text(json.dumps({**memo, weights_key: "0" * 64}))
    assert checkpoint_hash(copy, cache) != first
    cache.write_text(json.dumps(memo))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    assert checkpoint_hash(copy, cache) != first  # new size/mtime: recomputed, not served from the memo


def test_check_target_names_both_targets(tmp_path):
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    (engine_dir / "manifest.json").write_text(json.dumps({"target": H100, "profile": tiny_profile().to_dict(),
                                                          "backend": "native"}))
    with pytest.raises(TargetMismatchError) as info:
        load_engine_config(engine_dir, current_target("cpu"))
    assert "CUDA sm_90 (NVIDIA H100)" in str(info.value) and "CPU" in str(info.value)
    check_target(read_manifest(engine_dir), {**H100, "device_name": "NVIDIA H100 NVL"})  # same sm: accepted


def test_native_build_in_worker_matches_hf_logits(hf_dir, tmp_path):
    hf_model, src = hf_dir
    profile = tiny_profile()
    result = run_build(src, profile, tmp_path / "engines", "cpu", timeout=300)
    assert result.ok, result.error
    repo = EngineRepository(tmp_path / "engines")
    target = current_target("cpu")
    assert repo.lookup_or_none(src, profile, target) == repo.lookup(src, profile, target) == result.engine_dir
    assert result.engine_dir.relative_to(repo.root).parts == (f"tiny-llama-{repo.hash(src)[:12]}", "tiny-cpu", "cpu")
    manifest = read_manifest(result.engine_dir)
    assert manifest["status"] == "ready" and manifest["checkpoint_hash"] == checkpoint_hash(src)
    assert (manifest["model_name"], manifest["backend"], manifest["target"]) == ("tiny-llama", "native", target)
    assert manifest["profile"] == profile.to_dict() and manifest["build_seconds"] >= 0
    assert {"checkpoint_dir", "library_versions", "built_at"} <= set(manifest)
    assert [e["engine_dir"] for e in repo.list()] == [str(result.engine_dir)]
    assert not [p for p in result.engine_dir.parent.iterdir() if p.name.startswith(".building")]
    assert repo.lookup_or_none(src, tiny_profile(max_batch_size=4), target) is None  # same name, other limits

    payload, overrides = load_engine_config(result.engine_dir, target)
    assert payload == result.engine_dir / "checkpoint"
    assert overrides == {"cache": {"block_size": 4}, "device": {"dtype": "float32"},
                         "scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 128, "max_model_len": 256}}
    assert native_logits(payload, [5, 9, 33, 2, 17]).shape == (5, 256)
    torch.testing.assert_close(native_logits(payload, [5, 9, 33, 2, 17]), hf_logits(hf_model, [5, 9, 33, 2, 17]),
                               rtol=1e-4, atol=1e-4)


def test_lookup_misses_when_not_built(hf_dir, tmp_path):
    _, src = hf_dir
    repo = EngineRepository(tmp_path)
    assert repo.lookup_or_none(src, tiny_profile(), current_target("cpu")) is None
    with pytest.raises(FileNotFoundError, match="llmserve build"):
        repo.lookup(src, tiny_profile(), current_target("cpu"))


def test_worker_reports_broken_checkpoint(hf_dir, tmp_path):
    _, src = hf_dir
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in src.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    result = asyncio.run(build_in_background(broken, tiny_profile(), tmp_path / "engines", "cpu"))
    assert not result.ok and result.engine_dir is None
    assert "SafetensorError" in result.error  # the child's exception, carried to the parent
    assert EngineRepository(tmp_path / "engines").list() == []  # no manifest, no half-built folder
    leftovers = list((tmp_path / "engines").rglob("*.safetensors")) if (tmp_path / "engines").exists() else []
    assert leftovers == []


def test_worker_reports_missing_tensor(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    _, src = hf_dir
    broken = tmp_path / "tiny-llama"
    broken.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            del tensors["model.layers.1.mlp.down_proj.weight"]
            save_file(tensors, broken / f.name, metadata={"format": "pt"})
        else:
            (broken / f.name).write_bytes(f.read_bytes())
    result = run_build(broken, tiny_profile(), tmp_path / "engines", "cpu", timeout=300)
    assert not result.ok and "model.layers.1.mlp.down_proj.weight" in result.error


def test_native_build_from_converted_checkpoint_casts_and_checks(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from llmserve.checkpoint.convert import convert_checkpoint
    from llmserve.checkpoint.trtllm_format import TrtllmCheckpoint

    _, src = hf_dir
    converted = convert_checkpoint(src, tmp_path / "tp2", tp_size=2, dtype="float32", progress=False)
    built = build_native(converted, tiny_profile(dtype="bfloat16", tp_size=2), tmp_path / "engine")
    assert json.loads((built / "config.json").read_text())["dtype"] == "bfloat16"
    for (name, got), (_, want) in zip(TrtllmCheckpoint(built).merged_tensors(),
                                      TrtllmCheckpoint(converted).merged_tensors(), strict=True):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16)), name
    with pytest.raises(ValueError, match="tp=2 pp=1.*wants tp=1 pp=1"):
        build_native(converted, tiny_profile(), tmp_path / "other")
    rank1 = load_file(converted / "rank1.safetensors")
    del rank1["transformer.layers.0.mlp.proj.weight"]
    save_file(rank1, converted / "rank1.safetensors")
    with pytest.raises(ValueError, match="rank1.safetensors holds"):
        build_native(converted, tiny_profile(tp_size=2), tmp_path / "third")


def test_trtllm_build_command_from_profile():
    profile = load_profile(CONFIGS_DIR / "llama-3.1-8b-tp2.yaml")
    argv = trtllm_build_command(profile, "ckpt", "out")
    flags = dict(zip(argv[1::2], argv[2::2]))
    assert argv[0] == "trtllm-build"
    assert flags == {"--checkpoint_dir": "ckpt", "--output_dir": "out", "--max_batch_size": "256",
                     "--max_num_tokens": "8192", "--max_seq_len": "8192", "--max_input_len": "8192",
                     "--tokens_per_block": "32", "--gemm_plugin": "auto", "--gpt_attention_plugin": "auto",
                     "--kv_cache_type": "paged", "--remove_input_padding": "enable", "--context_fmha": "enable",
                     "--use_paged_context_fmha": "enable", "--use_fused_mlp": "enable",
                     "--multiple_profiles": "disable", "--workers": "2"}


def test_trtllm_build_fails_fast_without_tensorrt_llm(hf_dir, tmp_path):
    if not missing_trtllm():
        pytest.skip("tensorrt_llm and trtllm-build are installed here")
    _, src = hf_dir
    with pytest.raises(TrtllmUnavailableError) as info:
        build_trtllm(src, tiny_profile(backend="trtllm"), tmp_path / "out")
    assert "tensorrt_llm" in str(info.value) and "NVIDIA" in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing converted before failing


def native_logits(checkpoint_dir: Path, tokens: list[int]) -> torch.Tensor:
    """Prefill logits of every position from the native engine over `checkpoint_dir` (float32, CPU)."""
    from llmserve.config import CacheConfig, DeviceConfig, SchedulerConfig
    from llmserve.engine.engine import Engine
    from llmserve.models.loader import load_model

    config, model = load_model(checkpoint_dir)
    engine = Engine(model, config, EngineConfig(cache=CacheConfig(block_size=4, num_blocks=16),
                                                scheduler=SchedulerConfig(), device=DeviceConfig("cpu", "float32")))
    with torch.no_grad():
        return model.compute_logits(prefill_hidden(engine, tokens))  # [T, V]


def test_cli_convert_and_build(hf_dir, tmp_path, capsys):
    from llmserve.cli import main

    _, src = hf_dir
    assert main(["convert", "--model", str(src), "--out", str(tmp_path / "conv"), "--tp", "2", "--pp", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "conv").glob("rank*.safetensors")) == [
        f"rank{r}.safetensors" for r in range(4)]
    assert main(["convert", "--model", str(src), "--out", str(tmp_path / "bad"), "--tp", "3"]) == 1
    assert "tp=3 must divide" in capsys.readouterr().err
    if missing_trtllm():
        code = main(["build", "--checkpoint", str(src), "--config", str(CONFIGS_DIR / "llama-3.1-8b-tp1.yaml"),
                     "--repo", str(tmp_path / "engines")])
        assert code == 1 and "tensorrt_llm" in capsys.readouterr().err


def test_cli_builds_a_converted_checkpoint_once(hf_dir, tmp_path, capsys):
    from llmserve.cli import main

    _, src = hf_dir
    assert main(["convert", "--model", str(src), "--out", str(tmp_path / "conv"), "--tp", "2", "--pp", "2"]) == 0
    (tmp_path / "tp2pp2.toml").write_text('backend = "native"\ndtype = "float32"\nmax_seq_len = 256\n'
                                          'max_input_len = 128\ntp_size = 2\npp_size = 2\n')
    argv = ["build", "--checkpoint", str(tmp_path / "conv"), "--config", str(tmp_path / "tp2pp2.toml"),
            "--repo", str(tmp_path / "engines")]
    capsys.readouterr()
    assert main(argv) == 0
    engine_dir = Path(capsys.readouterr().out.strip())
    assert read_manifest(engine_dir)["profile"]["tp_size"] == 2
    assert main(argv) == 0
    again = capsys.readouterr()
    assert Path(again.out.strip()) == engine_dir and "already built" in again.err


def test_profile_device_must_match_the_target_kind():
    tiny_profile(device="any").check_target(H100)
    tiny_profile(device="any").check_target(current_target("cpu"))
    tiny_profile(device="cuda").check_target(H100)
    with pytest.raises(ValueError, match="'tiny-cpu' is written for CUDA .* build target is CPU; build it with "
                                         "`--device cuda`"):
        tiny_profile(device="cuda").check_target(current_target("cpu"))
    with pytest.raises(ValueError, match="written for CPU .* build target is CUDA"):
        tiny_profile(device="cpu").check_target(H100)


def test_worker_refuses_a_cuda_profile_on_cpu_before_writing(hf_dir, tmp_path):
    from llmserve.build.worker import build_engine

    _, src = hf_dir
    with pytest.raises(ValueError, match="written for CUDA"):
        build_engine(src, tiny_profile(device="cuda"), tmp_path / "engines", "cpu")
    assert not (tmp_path / "engines").exists()


def test_unparsable_profile_is_one_value_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("backend: [native\n")
    (tmp_path / "bad.toml").write_text("backend = \n")
    for name in ("bad.yaml", "bad.toml"):
        with pytest.raises(ValueError, match=f"build profile {tmp_path / name} is not valid"):
            load_profile(tmp_path / name)


def test_unchanged_rank_files_are_hard_linked_changed_ones_written(hf_dir, tmp_path):
    from llmserve.checkpoint.convert import convert_checkpoint

    _, src = hf_dir
    converted = convert_checkpoint(src, tmp_path / "conv", tp_size=2, dtype="float32", progress=False)
    os.chmod(converted / "rank0.safetensors", 0o600)  # the source's own mode, which the build must not touch
    same = build_native(converted, tiny_profile(tp_size=2), tmp_path / "same")
    cast = build_native(converted, tiny_profile(tp_size=2, dtype="bfloat16"), tmp_path / "cast")
    for rank in ("rank0.safetensors", "rank1.safetensors"):
        source = (converted / rank).stat()
        assert (same / rank).stat().st_ino == source.st_ino and source.st_nlink == 2
        assert (cast / rank).stat().st_ino != source.st_ino and (cast / rank).stat().st_nlink == 1
    assert stat.S_IMODE((converted / "rank0.safetensors").stat().st_mode) == 0o600


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_built_engine_gets_the_permissions_of_the_umask(hf_dir, tmp_path, umask):
    _, src = hf_dir
    previous = os.umask(umask)  # inherited by the build worker
    try:
        # bfloat16: a cast, so every weight file is written by the build (a linked one keeps its source's mode)
        result = run_build(src, tiny_profile(dtype="bfloat16"), tmp_path / "engines", "cpu", timeout=300)
    finally:
        os.umask(previous)
    assert result.ok, result.error
    modes = {path.relative_to(result.engine_dir).as_posix(): stat.S_IMODE(path.stat().st_mode)
             for path in [result.engine_dir, *result.engine_dir.rglob("*")]}
    assert modes == {".": 0o777 & ~umask, "manifest.json": 0o666 & ~umask, "checkpoint": 0o777 & ~umask,
                     "checkpoint/config.json": 0o666 & ~umask, "checkpoint/rank0.safetensors": 0o666 & ~umask,
                     "checkpoint/generation_config.json": 0o666 & ~umask}


@pytest.mark.parametrize("grace_s", [30.0, 0.0])  # the child cleans up itself / is killed and the parent cleans up
def test_cancelled_background_build_leaves_no_engine(tmp_path, monkeypatch, grace_s):
    from llmserve.build import worker
    from tests.test_cli_interrupt import NUM_LAYERS, save_many_layer_llama

    monkeypatch.setattr(worker, "STOP_GRACE_S", grace_s)
    killed = []
    clean_up_for_child = worker.remove_staging_of
    monkeypatch.setattr(worker, "remove_staging_of",
                        lambda root, pid: (killed.append(pid), clean_up_for_child(root, pid)))
    src = save_many_layer_llama(tmp_path / "many-layers", NUM_LAYERS)
    repo = tmp_path / "engines"

    async def cancel_once_writing() -> None:
        # bfloat16: converted from the float32 source, slowly enough to cancel (a match would only be linked)
        task = asyncio.create_task(build_in_background(src, tiny_profile(dtype="bfloat16"), repo, "cpu"))
        while not any(repo.glob(".building-*")):
            assert not task.done(), task.result()
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_once_writing())
    assert [p.name for p in repo.iterdir()] == [".checkpoint_hashes.json"]
    assert len(killed) == (grace_s == 0.0)  # the kill path ran exactly when no grace was given


def test_hf_checkpoint_already_in_the_profile_dtype_is_linked_and_serves_the_same_logits(hf_dir, tmp_path):
    hf_model, src = hf_dir
    linked = build_native(src, tiny_profile(), tmp_path / "linked")  # the tiny HF model is saved in float32
    assert (linked / "model.safetensors").stat().st_ino == (src / "model.safetensors").stat().st_ino
    converted = build_native(src, tiny_profile(dtype="bfloat16"), tmp_path / "cast")  # a cast must convert
    assert (converted / "rank0.safetensors").is_file() and not (converted / "model.safetensors").exists()
    from llmserve.engine.engine import Engine

    config = apply_overrides(EngineConfig(model=str(linked)), {"cache": {"num_blocks": 16, "block_size": 4}})
    engine = Engine.from_config(config, progress=lambda message: None)
    tokens = [1, 5, 9, 33, 70, 2]
    logits = engine.runner.model.compute_logits(prefill_hidden(engine, tokens))
    torch.testing.assert_close(logits, hf_logits(hf_model, tokens), atol=1e-4, rtol=1e-4)


def test_hf_checkpoint_is_converted_when_tensor_parallel(hf_dir, tmp_path):
    _, src = hf_dir
    built = build_native(src, tiny_profile(tp_size=2), tmp_path / "tp2")
    assert sorted(p.name for p in built.glob("*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]
