"""Engine builds in a separate process: the caller (CLI or server) survives any failure of the build.

Parent side: `run_build` (blocking) and `build_in_background` (asyncio). Child side: `python -m
llmserve.build.worker --json-args '{...}'` builds into a temporary folder, writes the manifest last and
renames the folder into the repository, then prints one JSON result line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from llmserve.build.profile import BuildProfile, load_profile, profile_from_dict

RESULT_PREFIX = "LLMSERVE_BUILD_RESULT "
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@dataclass(slots=True)
class BuildResult:
    """The outcome of one build: the engine folder on success, the child's error text on failure."""

    ok: bool
    engine_dir: Path | None = None
    error: str | None = None


# ---- parent side ---------------------------------------------------------------------------

def worker_command(checkpoint_dir: str | Path, profile: str | Path | BuildProfile, repo_root: str | Path,
                   device: str = "cpu") -> list[str]:
    """The argv of a build worker process."""
    spec = {"checkpoint_dir": str(checkpoint_dir), "repo_root": str(repo_root), "device": device}
    if isinstance(profile, BuildProfile):
        spec["profile"] = profile.to_dict()
    else:
        spec["profile_path"] = str(profile)
    return [sys.executable, "-m", "llmserve.build.worker", "--json-args", json.dumps(spec)]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)  # the child must import this very llmserve, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return env


def parse_result(returncode: int, stdout: str, stderr: str) -> BuildResult:
    """The child's result line, or its stderr tail when it died without one."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            raw = json.loads(line[len(RESULT_PREFIX):])
            engine_dir = Path(raw["engine_dir"]) if raw.get("engine_dir") else None
            return BuildResult(raw["ok"] and returncode == 0, engine_dir, raw.get("error"))
    tail = stderr.strip()[-4000:] or f"(no output; exit code {returncode})"
    return BuildResult(False, None, f"build worker exited with code {returncode}: {tail}")


def run_build(checkpoint_dir: str | Path, profile: str | Path | BuildProfile, repo_root: str | Path,
              device: str = "cpu", timeout: float | None = None) -> BuildResult:
    """Build in a child process and wait; never raises for a failed build."""
    command = worker_command(checkpoint_dir, profile, repo_root, device)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_child_env(), check=False)
    except subprocess.TimeoutExpired:
        return BuildResult(False, None, f"build timed out after {timeout} s")
    return parse_result(done.returncode, done.stdout, done.stderr)


async def build_in_background(checkpoint_dir: str | Path, profile: str | Path | BuildProfile,
                              repo_root: str | Path, device: str = "cpu") -> BuildResult:
    """`run_build` for asyncio: the event loop keeps serving; cancelling the task kills the child."""
    command = worker_command(checkpoint_dir, profile, repo_root, device)
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=_child_env())
    try:
        stdout, stderr = await proc.communicate()
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        raise
    return parse_result(proc.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"))


# ---- child side ----------------------------------------------------------------------------

def build_engine(checkpoint_dir: str | Path, profile: BuildProfile, repo_root: str | Path,
                 device: str = "cpu") -> Path:
    """Build into a temp folder beside the final one; manifest written last, then an atomic rename."""
    from llmserve.build.repository import EngineRepository, new_manifest
    from llmserve.build.target import current_target, library_versions

    if profile.backend == "trtllm":  # fail fast: before hashing a multi-GB checkpoint
        from llmserve.build.trtllm_build import require_trtllm

        require_trtllm()
    target = current_target(device)
    repo = EngineRepository(repo_root)
    digest = repo.hash(checkpoint_dir)
    final = repo.engine_dir_for(checkpoint_dir, profile, target, digest)
    final.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix=f".building-{final.name}-", dir=final.parent))
    try:
        _run_backend(checkpoint_dir, profile, staging)
        manifest = new_manifest(checkpoint_dir, digest, profile, target, library_versions(),
                                datetime.now(timezone.utc).isoformat(timespec="seconds"), time.monotonic() - start)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if final.exists():  # a rebuild (e.g. the profile changed under the same name)
            shutil.rmtree(final)
        staging.rename(final)  # same filesystem: readers see no engine or a whole one
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _run_backend(checkpoint_dir: str | Path, profile: BuildProfile, out_dir: Path) -> None:
    if profile.backend == "trtllm":
        from llmserve.build.trtllm_build import build_trtllm

        build_trtllm(checkpoint_dir, profile, out_dir)
    else:
        from llmserve.build.native import build_native

        build_native(checkpoint_dir, profile, out_dir)


def _report(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="llmserve engine build worker (internal)")
    parser.add_argument("--json-args", required=True)
    spec = json.loads(parser.parse_args(argv).json_args)
    try:
        profile = (profile_from_dict(spec["profile"]) if "profile" in spec else load_profile(spec["profile_path"]))
        engine_dir = build_engine(spec["checkpoint_dir"], profile, spec["repo_root"], spec.get("device", "cpu"))
    except Exception as exc:  # noqa: BLE001 (any build failure becomes the reported error)
        traceback.print_exc()
        _report({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    _report({"ok": True, "engine_dir": str(engine_dir)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
