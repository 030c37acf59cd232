"""Outputs appear whole or not at all, with the umask's permissions: `atomic_dir` and the converter's use of it."""

from __future__ import annotations

import os
import stat

import pytest
from safetensors.torch import load_file, save_file

from llmserve.checkpoint.atomic_dir import make_dirs, staged_dir
from llmserve.checkpoint.convert import convert_checkpoint
from llmserve.checkpoint.trtllm_format import TrtllmCheckpoint
from tests.conftest import make_hf_llama


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    make_hf_llama(seed=11).save_pretrained(path)
    return path


def modes(root) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_staged_dir_publishes_only_a_completed_block(tmp_path):
    final = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError, match="half way"):
        with staged_dir(final) as staging:
            (staging / "part").write_text("1")
            raise RuntimeError("half way")
    assert list(tmp_path.iterdir()) == []  # no temp folder, no parents it created
    with staged_dir(final) as staging:
        (staging / "part").write_text("1")
    assert [p.name for p in final.parent.iterdir()] == ["out"] and (final / "part").read_text() == "1"


def test_staged_dir_replaces_a_previous_output_whole(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    with staged_dir(final) as staging:
        (staging / "new").write_text("new")
        assert (final / "old").exists()  # the previous output stays readable until the rename
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in final.iterdir()] == ["new"]


def test_staged_dir_in_another_root_creates_parents_only_when_done(tmp_path):
    final = tmp_path / "model" / "profile" / "cpu"
    with staged_dir(final, staging_root=tmp_path, prefix=".building-") as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".building-")
        assert not (tmp_path / "model").exists()
    assert final.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_make_dirs_names_the_file_in_the_way(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'file'} is a file, not a directory"):
        make_dirs(tmp_path / "file" / "sub" / "dir")
    assert make_dirs(tmp_path / "x" / "y") == [tmp_path / "x", tmp_path / "x" / "y"]


def test_failed_conversion_leaves_nothing(hf_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    tensors = load_file(hf_dir / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"  # a wrong shape fails half way through rank 0
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        convert_checkpoint(broken, tmp_path / "new" / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_reconversion_replaces_the_previous_conversion_whole(hf_dir, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(hf_dir, out, tp_size=2, progress=False)
    old_rank0 = (out / "rank0.safetensors").stat().st_ino
    convert_checkpoint(hf_dir, out, tp_size=1, progress=False)
    assert sorted(p.name for p in out.glob("rank*")) == ["rank0.safetensors"]
    assert (out / "rank0.safetensors").stat().st_ino != old_rank0  # a new file, not rewritten in place
    assert TrtllmCheckpoint(out).mapping.tp_size == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or replaced folder left


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_converted_checkpoint_gets_the_permissions_of_the_umask(hf_dir, tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = convert_checkpoint(hf_dir, tmp_path / "out", tp_size=2, progress=False)
    finally:
        os.umask(previous)
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    assert modes(out) == {".": dir_mode, "config.json": file_mode, "generation_config.json": file_mode,
                          "rank0.safetensors": file_mode, "rank1.safetensors": file_mode}
