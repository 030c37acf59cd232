"""The engine repository: one folder per (model, profile, target), each with a `manifest.json`.

Layout: `ROOT/{model_name}-{hash12}/{profile_name}/{target_key}/` holding `manifest.json` and
the backend's files (`checkpoint/` for native, plus `trtllm_engine/` for trtllm).
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


class TargetMismatchError(RuntimeError):
    """An engine was built for another target than this machine."""


def checkpoint_files(checkpoint_dir: str | Path) -> list[Path]:
    """The files whose bytes define a checkpoint: config.json and every *.safetensors, sorted."""
    root = Path(checkpoint_dir)
    files = [root / "config.json", *sorted(root.glob("*.safetensors"))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {root} lacks {missing}")
    return files


def checkpoint_hash(checkpoint_dir: str | Path, cache_file: str | Path | None = None) -> str:
    """sha256 over config.json and every *.safetensors (names and bytes); memoised in `cache_file`."""
    files = checkpoint_files(checkpoint_dir)
    key = _stat_key(files)
    cache = _read_cache(cache_file)
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):  # streamed: an 8B checkpoint never sits in memory
                digest.update(chunk)
    value = digest.hexdigest()
    if cache_file is not None:
        cache[key] = value
        _write_atomic(Path(cache_file), json.dumps(cache, indent=1))
    return value


def _stat_key(files: list[Path]) -> str:
    # A file rewritten in place changes its size or mtime_ns, which invalidates the memo.
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def _read_cache(cache_file: str | Path | None) -> dict:
    if cache_file is None or not Path(cache_file).is_file():
        return {}
    try:
        return json.loads(Path(cache_file).read_text())
    except (OSError, ValueError):
        return {}  # a corrupt memo is only a lost optimisation


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def model_name(checkpoint_dir: str | Path) -> str:
    return Path(checkpoint_dir).resolve().name


def check_target(manifest: dict, target: dict) -> None:
    """Raise TargetMismatchError naming both targets when `manifest` was built for another one."""
    built_for = manifest.get("target", {})
    if not same_target(built_for, target):
        raise TargetMismatchError(
            f"engine was built for {describe(built_for)} but this machine is {describe(target)}; "
            f"rebuild it here with `llmserve build`")


def read_manifest(engine_dir: str | Path) -> dict:
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{engine_dir} is not a built engine: it has no {MANIFEST}")
    return json.loads(path.read_text())


def engine_payload(engine_dir: str | Path, manifest: dict) -> Path:
    """What a runtime opens: the native checkpoint, or the TensorRT-LLM engine folder."""
    sub = "trtllm_engine" if manifest.get("backend") == "trtllm" else "checkpoint"
    return Path(engine_dir) / sub


def load_engine(engine_dir: str | Path, target: dict | None = None) -> tuple[Path, dict]:
    """(payload path, engine overrides) of a built engine; refuses one built for another `target`.

    Overrides: {'cache': {...}, 'scheduler': {...}, 'device': {'dtype': ...}}, see `apply_overrides`.
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


class EngineRepository:
    """Engines on disk under `root`, found by checkpoint content hash, profile and target."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def hash(self, checkpoint_dir: str | Path) -> str:
        return checkpoint_hash(checkpoint_dir, self.root / HASH_CACHE)

    def engine_dir_for(self, checkpoint_dir: str | Path, profile: BuildProfile, target: dict,
                       digest: str | None = None) -> Path:
        """Where the engine of (checkpoint, profile, target) lives, built or not."""
        digest = digest or self.hash(checkpoint_dir)
        return self.root / f"{model_name(checkpoint_dir)}-{digest[:12]}" / profile.name / target_key(target)

    def lookup(self, checkpoint_dir: str | Path, profile: BuildProfile, target: dict) -> Path | None:
        """The built engine's folder, or None when missing or built from a different profile."""
        engine_dir = self.engine_dir_for(checkpoint_dir, profile, target)
        if not (engine_dir / MANIFEST).is_file():
            return None
        manifest = read_manifest(engine_dir)
        return engine_dir if manifest.get("profile") == profile.to_dict() else None

    def entries(self) -> list[dict]:
        """Every built engine's manifest, with its folder under the key 'engine_dir'."""
        found = []
        for path in sorted(self.root.glob(f"*/*/*/{MANIFEST}")):
            found.append({**json.loads(path.read_text()), "engine_dir": str(path.parent)})
        return found


def new_manifest(checkpoint_dir: str | Path, digest: str, profile: BuildProfile, target: dict,
                 versions: dict, built_at: str, build_seconds: float) -> dict:
    """The manifest of a finished build (written last, so a folder with one is complete)."""
    return {"checkpoint_hash": digest, "checkpoint_dir": str(Path(checkpoint_dir).resolve()),
            "model_name": model_name(checkpoint_dir), "profile": profile.to_dict(), "backend": profile.backend,
            "target": target, "library_versions": versions, "built_at": built_at,
            "build_seconds": round(build_seconds, 3)}
