"""The engine repository: one folder per (model, profile, target), each with a `manifest.json`.

Layout: `ROOT/{model_name}-{hash12}/{profile_name}/{target_key}/` holding `manifest.json` and the
backend's files (`checkpoint/` for native, `trtllm_engine/` for trtllm). A folder is built in a hidden
temporary folder of ROOT and renamed into place with the manifest already written, so a manifest means
a whole engine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from llmserve.build.profile import BuildProfile, profile_from_dict
from llmserve.build.target import describe, same_target, target_key

MANIFEST = "manifest.json"
HASH_CACHE = ".checkpoint_hashes.json"
CHUNK_BYTES = 16 << 20
READY = "ready"


class TargetMismatchError(RuntimeError):
    """An engine was built for another target than this machine."""


# ---- checkpoint content hash ----------------------------------------------------------------

def checkpoint_files(checkpoint_dir: str | Path) -> list[Path]:
    """The files whose bytes define a checkpoint: config.json and every *.safetensors, sorted."""
    root = Path(checkpoint_dir)
    files = [root / "config.json", *sorted(root.glob("*.safetensors"))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or len(files) == 1:
        raise FileNotFoundError(f"checkpoint {root} lacks {missing or ['*.safetensors']}")
    return files


def checkpoint_hash(checkpoint_dir: str | Path, cache_file: str | Path | None = None) -> str:
    """sha256 over (name, sha256 of bytes) of each checkpoint file; per-file digests memoised in `cache_file`.

    The memo is keyed by (resolved path, size, mtime_ns): a file rewritten in place is rehashed, an
    untouched 16 GB shard is not.
    """
    memo = _read_cache(cache_file)
    digest, changed = hashlib.sha256(), False
    for path in checkpoint_files(checkpoint_dir):
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in memo:
            memo[key], changed = _file_sha256(path), True
        digest.update(f"{path.name}\0{memo[key]}\n".encode())
    if cache_file is not None and changed:
        _write_atomic(Path(cache_file), json.dumps(memo, indent=1))
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):  # streamed: an 8B checkpoint never sits in memory
            digest.update(chunk)
    return digest.hexdigest()


def _read_cache(cache_file: str | Path | None) -> dict[str, str]:
    if cache_file is None or not Path(cache_file).is_file():
        return {}
    try:
        return json.loads(Path(cache_file).read_text())
    except (OSError, ValueError):
        return {}  # a corrupt memo is only a lost optimisation


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)  # concurrent builds: last writer wins, nobody reads half a file
    finally:
        tmp.unlink(missing_ok=True)  # interrupted before the rename: no stray temporary file


def model_name(checkpoint_dir: str | Path) -> str:
    return Path(checkpoint_dir).resolve().name


# ---- manifests --------------------------------------------------------------------------------

def new_manifest(checkpoint_dir: str | Path, digest: str, profile: BuildProfile, target: dict,
                 versions: dict, built_at: str, build_seconds: float) -> dict:
    """The manifest of a finished build (written before the folder is renamed into place)."""
    return {"status": READY, "checkpoint_hash": digest, "checkpoint_dir": str(Path(checkpoint_dir).resolve()),
            "model_name": model_name(checkpoint_dir), "backend": profile.backend, "profile": profile.to_dict(),
            "target": target, "library_versions": versions, "built_at": built_at,
            "build_seconds": round(build_seconds, 3)}


def read_manifest(engine_dir: str | Path) -> dict:
    """The manifest of a built engine; FileNotFoundError when `engine_dir` is not one."""
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{engine_dir} is not a built engine: it has no {MANIFEST} "
                                f"(build one with `llmserve build`)")
    return json.loads(path.read_text())


def check_target(manifest: dict, target: dict) -> None:
    """Raise TargetMismatchError naming both targets when `manifest` was built for another one."""
    built_for = manifest.get("target", {})
    if not same_target(built_for, target):
        raise TargetMismatchError(
            f"engine was built for {describe(built_for)} but this machine is {describe(target)}; "
            f"rebuild it here with `llmserve build`")


def engine_payload(engine_dir: str | Path, manifest: dict) -> Path:
    """What a runtime opens: the native checkpoint, or the TensorRT-LLM engine folder."""
    sub = "trtllm_engine" if manifest.get("backend") == "trtllm" else "checkpoint"
    return Path(engine_dir) / sub


def load_engine_config(engine_dir: str | Path, target: dict | None = None) -> tuple[Path, dict]:
    """(checkpoint or engine folder to open, EngineConfig overrides) of a built engine.

    Refuses (TargetMismatchError) an engine built for another `target`. Overrides are
    {'cache': {'block_size'}, 'scheduler': {'max_num_seqs', 'max_num_batched_tokens', 'max_model_len'},
    'device': {'dtype'}}; `apply_overrides` puts them into an EngineConfig.
    """
    manifest = read_manifest(engine_dir)
    if target is not None:
        check_target(manifest, target)
    profile = profile_from_dict(manifest["profile"])
    overrides = profile.engine_overrides()
    overrides["device"] = {"dtype": profile.dtype}
    return engine_payload(engine_dir, manifest), overrides


def apply_overrides(engine_config, overrides: dict):
    """A copy of `engine_config` (EngineConfig) with each sub-config's fields replaced by `overrides`."""
    parts = {name: dataclasses.replace(getattr(engine_config, name), **values) for name, values in overrides.items()}
    return dataclasses.replace(engine_config, **parts)


# ---- the repository -----------------------------------------------------------------------------

class EngineRepository:
    """Engines on disk under `root`, found by checkpoint content hash, profile and target."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def hash(self, checkpoint_dir: str | Path) -> str:
        """The checkpoint's content hash (memoised under the repository root)."""
        return checkpoint_hash(checkpoint_dir, self.root / HASH_CACHE)

    def engine_dir_for(self, checkpoint_dir: str | Path, profile: BuildProfile, target: dict,
                       digest: str | None = None) -> Path:
        """Where the engine of (checkpoint, profile, target) lives, built or not."""
        digest = digest or self.hash(checkpoint_dir)
        return self.root / f"{model_name(checkpoint_dir)}-{digest[:12]}" / profile.name / target_key(target)

    def lookup_or_none(self, checkpoint_dir: str | Path, profile: BuildProfile, target: dict) -> Path | None:
        """The ready engine's folder, or None when missing or built from a different profile of that name.

        Hashes the checkpoint (memoised): call it off the event loop.
        """
        engine_dir = self.engine_dir_for(checkpoint_dir, profile, target)
        if not (engine_dir / MANIFEST).is_file():
            return None
        manifest = read_manifest(engine_dir)
        ready = manifest.get("status") == READY and manifest.get("profile") == profile.to_dict()
        return engine_dir if ready else None

    def lookup(self, checkpoint_dir: str | Path, profile: BuildProfile, target: dict) -> Path:
        """The ready engine's folder; FileNotFoundError saying where it was expected and how to build it."""
        found = self.lookup_or_none(checkpoint_dir, profile, target)
        if found is None:
            expected = self.engine_dir_for(checkpoint_dir, profile, target)
            raise FileNotFoundError(
                f"no engine for {model_name(checkpoint_dir)} with profile {profile.name!r} on {describe(target)} "
                f"(expected {expected}); build it with `llmserve build --checkpoint {checkpoint_dir} "
                f"--config <profile file> --repo {self.root}`")
        return found

    def list(self) -> list[dict]:
        """Every built engine's manifest, with its folder under the key 'engine_dir', sorted by folder."""
        return [{**json.loads(path.read_text()), "engine_dir": str(path.parent)}
                for path in sorted(self.root.glob(f"*/*/*/{MANIFEST}"))]


Repository = EngineRepository  # the short name the server uses
