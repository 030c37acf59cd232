"""Engine builds in a separate process: the caller (CLI or server) survives any failure of the build.

Parent side: `run_build` (blocking) and `build_in_background` (asyncio). Child side: `python -m
llmserve.build.worker --json-args '{...}'` builds into a temporary folder in the repository root, writes
the manifest last and renames the folder into place, then prints one JSON result line on stdout.

Stopping a build (Ctrl-C in the CLI, a cancelled server task, a timeout) sends the child SIGTERM; it
removes its temporary folder and exits. The child runs in its own session, so a terminal's Ctrl-C
reaches only the parent and the child is stopped once, by the parent. A child that does not stop within
`STOP_GRACE_S` is killed and the parent removes its temporary folders (named after the child's pid).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from llmserve.build.profile import BuildProfile, load_profile, profile_from_dict

RESULT_PREFIX = "LLMSERVE_BUILD_RESULT "
STOP_GRACE_S = 30.0  # a rank file being written must finish before the child can clean up
INTERRUPTED = "interrupted"
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
    """Build in a child process and wait; never raises for a failed build.

    KeyboardInterrupt (Ctrl-C) stops the child, which removes its partial engine, and is re-raised.
    """
    command = worker_command(checkpoint_dir, profile, repo_root, device)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env(),
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_worker(proc, repo_root)
            return BuildResult(False, None, f"build timed out after {timeout} s")
        except BaseException:
            stop_worker(proc, repo_root)
            raise
    return parse_result(proc.returncode, stdout, stderr)


def stop_worker(proc: subprocess.Popen, repo_root: str | Path) -> None:
    """SIGTERM the build child and wait for its clean-up; kill it after STOP_GRACE_S and clean up for it."""
    proc.terminate()
    try:
        proc.communicate(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        remove_staging_of(repo_root, proc.pid)


def staging_prefix(engine_dir_name: str, pid: int) -> str:
    """The name start of build worker `pid`'s temporary folder in the repository root."""
    return f".building-{engine_dir_name}-pid{pid}-"


def remove_staging_of(repo_root: str | Path, pid: int) -> None:
    """Remove the temporary folders of a killed build worker (it had no chance to)."""
    for path in Path(repo_root).glob(staging_prefix("*", pid) + "*"):
        shutil.rmtree(path, ignore_errors=True)


async def build_in_background(checkpoint_dir: str | Path, profile: str | Path | BuildProfile,
                              repo_root: str | Path, device: str = "cpu") -> BuildResult:
    """`run_build` for asyncio: the event loop keeps serving; cancelling the task stops the child."""
    command = worker_command(checkpoint_dir, profile, repo_root, device)
    proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=_child_env(),
                                                start_new_session=True)
    communicating = asyncio.ensure_future(proc.communicate())
    try:
        stdout, stderr = await asyncio.shield(communicating)
    except asyncio.CancelledError:
        await _stop_worker_async(proc, communicating, repo_root)
        raise
    return parse_result(proc.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"))


async def _stop_worker_async(proc: asyncio.subprocess.Process, communicating: asyncio.Future,
                             repo_root: str | Path) -> None:
    # The pipes keep being read while the child cleans up, so it never blocks on a full pipe.
    proc.terminate()
    try:
        await asyncio.wait_for(asyncio.shield(communicating), STOP_GRACE_S)
    except asyncio.TimeoutError:
        proc.kill()
        await communicating
        remove_staging_of(repo_root, proc.pid)


# ---- child side ----------------------------------------------------------------------------

def build_engine(checkpoint_dir: str | Path, profile: BuildProfile, repo_root: str | Path,
                 device: str = "cpu", raise_if_stopped=lambda: None) -> Path:
    """Build into a temp folder in the repository root; manifest written last, then renamed into place.

    `raise_if_stopped()` runs before the manifest is written, so a stop that was asked for is never
    published as a finished engine.
    """
    from llmserve.build.repository import MANIFEST, EngineRepository, new_manifest
    from llmserve.build.target import current_target, library_versions
    from llmserve.checkpoint.atomic_dir import staged_dir

    if profile.backend == "trtllm":  # fail fast: before hashing a multi-GB checkpoint
        from llmserve.build.trtllm_build import require_trtllm

        require_trtllm()
    target = current_target(device)
    profile.check_target(target)
    repo = EngineRepository(repo_root)
    digest = repo.hash(checkpoint_dir)
    final = repo.engine_dir_for(checkpoint_dir, profile, target, digest)
    start = time.monotonic()
    # Staged in the root, not beside `final`: an interrupted build leaves no empty model/profile folders,
    # and `EngineRepository.list` never sees a half-built engine.
    with staged_dir(final, staging_root=repo.root, prefix=staging_prefix(final.name, os.getpid())) as staging:
        _run_backend(checkpoint_dir, profile, staging)
        raise_if_stopped()
        manifest = new_manifest(checkpoint_dir, digest, profile, target, library_versions(),
                                datetime.now(timezone.utc).isoformat(timespec="seconds"), time.monotonic() - start)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
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


class StopSignal:
    """SIGTERM (the parent stopping the build) and SIGINT raise KeyboardInterrupt once; later ones are
    ignored, so the clean-up of the temporary folder runs to its end.

    A KeyboardInterrupt raised while an extension module is being imported can be swallowed by its C
    code (seen: a build finished 8 s after its SIGTERM), so the signal is also remembered and
    `raise_if_stopped` raises again before anything is published.
    """

    def __init__(self) -> None:
        self.received = False

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._interrupt)

    def raise_if_stopped(self) -> None:
        if self.received:
            raise KeyboardInterrupt

    def _interrupt(self, signum, frame):
        self.received = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    stop = StopSignal()
    stop.install()
    parser = argparse.ArgumentParser(description="llmserve engine build worker (internal)")
    parser.add_argument("--json-args", required=True)
    spec = json.loads(parser.parse_args(argv).json_args)
    try:
        profile = (profile_from_dict(spec["profile"]) if "profile" in spec else load_profile(spec["profile_path"]))
        engine_dir = build_engine(spec["checkpoint_dir"], profile, spec["repo_root"], spec.get("device", "cpu"),
                                  stop.raise_if_stopped)
    except KeyboardInterrupt:
        _report({"ok": False, "error": INTERRUPTED})
        return 130
    except Exception as exc:  # noqa: BLE001 (any build failure becomes the reported error)
        traceback.print_exc()
        _report({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    _report({"ok": True, "engine_dir": str(engine_dir)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
