"""The documentation keeps its promises: no link or quoted path leaves the repository, and every
block marked runnable (a fenced block whose info string is `bash runnable` or `python runnable`,
plus `slow` when it needs the default model) runs as written, on CPU, and exits 0.

Each block runs on its own in a fresh temporary folder whose entries link to the repository's,
with `.venv/bin` first on PATH, under `bash -e -o pipefail` (or python), in its own process group.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.docs_helpers import (FORBIDDEN, REPO, Block, blocks_of, code_path_problem,
                                link_problem, link_targets, markdown_files, problems_in, runnable_blocks,
                                split_fences, tracked_files)

VENV_BIN = REPO / ".venv" / "bin"
DEFAULT_MODEL_READY = REPO / "checkpoints" / "smollm2-135m-instruct" / ".complete"
TIMEOUT_S = {"fast": 60, "slow": 300}
# A server that a block stops with SIGTERM shuts down gracefully; it gets this long to exit.
LEFTOVER_GRACE_S = 20.0


# ---- the link tests ---------------------------------------------------------------------------
def test_markdown_files_are_found():
    names = {str(p.relative_to(REPO)) for p in markdown_files()}
    assert {"README.md", "docs/architecture.md", "bench/workloads.md"} <= names, names


def test_no_link_or_path_leaves_the_repository():
    problems = [problem for path in markdown_files() for problem in problems_in(path)]
    assert not problems, "\n".join(problems)


def test_link_checker_flags_each_kind_of_bad_link():
    source = REPO / "docs" / "architecture.md"
    assert link_problem(source, "../../outside.md") == "a path outside the repository"
    assert link_problem(source, "missing.md") == "a file that does not exist"
    assert link_problem(source, "/work/main/README.md").startswith("an absolute path")
    assert link_problem(source, "https://example.com/").startswith("an outside link")
    assert link_problem(source, "serving.md#no-such-heading").startswith("no heading")
    assert link_problem(source, "architecture.md#the-step-contract") is None
    assert link_problem(source, "../README.md") is None
    assert code_path_problem(REPO / "README.md", "llmserve/engine/no_such.py") is not None
    assert code_path_problem(REPO / "README.md", "llmserve/core/kv_cache.py") is None
    bad = "See [design](../shared/DESIGN.md) and `/work/notes.md`.\n```bash\ncat ../shared/x\n```\n"
    assert len([why for pattern, why in FORBIDDEN for _ in pattern.finditer(bad)]) == 3


def test_fenced_blocks_are_split_from_prose():
    text = "a [x](y.md)\n```bash runnable slow\necho '[z](w.md)'\n```\nb\n"
    prose, blocks = split_fences(text, REPO / "README.md")
    assert link_targets(prose) == ["y.md"]
    assert [(b.line, b.runnable, b.slow, b.text) for b in blocks] == [(2, True, True, "echo '[z](w.md)'\n")]


def test_docs_mark_blocks_runnable():
    names = {block.name.split(":")[0] for block in runnable_blocks()}
    assert {"README.md", "docs/trtllm.md"} <= names, names


def test_every_runnable_marker_is_run():
    """A `runnable` marker that the runner would skip (another language, or a file it does not read)
    is a promise nobody checks."""
    run = {block.name for block in runnable_blocks()}
    marked = [block for path in markdown_files() for block in blocks_of(str(path.relative_to(REPO)))
              if "runnable" in block.words]
    assert all(block.name in run for block in marked), [b.name for b in marked if b.name not in run]


# ---- running the runnable blocks ------------------------------------------------------------
def _params():
    for block in runnable_blocks():
        marks = [pytest.mark.slow] if block.slow else []
        yield pytest.param(block, id=block.name, marks=marks)


@pytest.mark.parametrize("block", list(_params()))
def test_runnable_block_exits_zero(block: Block):
    if block.slow and not DEFAULT_MODEL_READY.exists():
        pytest.skip("the default model is not materialised (make pull)")
    for port in re.findall(r"--port[ =](\d+)", block.text):
        assert _port_is_free(int(port)), f"{block.name} needs port {port}, which is in use here"
    with tempfile.TemporaryDirectory(prefix="llmserve-docs-") as workdir:
        _link_repository_into(Path(workdir))
        returncode, output, leftovers = _run_block(block, Path(workdir))
    report = f"\n--- block ---\n{block.text}--- output ---\n{output[-4000:]}"
    assert returncode == 0, f"{block.name} exited {returncode}{report}"
    assert not leftovers, f"{block.name} left processes running (stop what it starts){report}"


def test_block_runner_reports_failures_and_stops_leftovers(tmp_path):
    def run(text: str) -> tuple[int, str, bool]:
        return _run_block(Block(REPO / "README.md", 1, "bash runnable", text), tmp_path, leftover_grace_s=0.5)

    assert run("echo ok\n") == (0, "ok\n", False)
    assert run("false\necho never\n")[:2] == (1, "")  # bash -e: the first failure ends the block
    code, _, leftovers = run("sleep 60 &\necho $! > pid\n")
    stat = Path(f"/proc/{(tmp_path / 'pid').read_text().strip()}/stat")
    assert (code, leftovers) == (0, True)
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", "the sleep still runs"


def _link_repository_into(workdir: Path) -> None:
    """Give `workdir` the repository's top-level entries as symlinks, so that relative paths in
    the docs resolve while whatever a block writes (ckpt/, engines/) stays in `workdir`."""
    names = {name.split("/")[0] for name in tracked_files()} | {".venv"}
    for name in sorted(names):
        if (REPO / name).exists():
            (workdir / name).symlink_to(REPO / name)


def _run_block(block: Block, workdir: Path, leftover_grace_s: float = LEFTOVER_GRACE_S) -> tuple[int, str, bool]:
    """(exit status, stdout and stderr, whether it left processes running) of the block, run in its
    own process group; whatever is left in the group is stopped."""
    language = block.words[0]
    script = workdir / ("block.sh" if language == "bash" else "block.py")
    script.write_text(block.text)
    command = ["bash", "-e", "-o", "pipefail", str(script)] if language == "bash" else ["python", str(script)]
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    env.pop("VIRTUAL_ENV", None)
    timeout_s = TIMEOUT_S["slow" if block.slow else "fast"]
    # A file, not a pipe: a server the block forgot would hold a pipe open until the timeout.
    with open(workdir / "block.out", "w+") as out:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_group(process.pid, grace_s=0.0)
            returncode = process.wait()
            out.seek(0, os.SEEK_END)
            out.write(f"\n[timed out after {timeout_s} s]\n")
        leftovers = not _group_ends_within(process.pid, leftover_grace_s)
        _stop_group(process.pid, grace_s=5.0)
        out.seek(0)
        return returncode, out.read(), leftovers


def _group_ends_within(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _group_is_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _group_is_alive(pgid: int) -> bool:
    """Whether a process of the group still runs; zombies do not count (an orphan that exited may
    wait a while for a container's init to reap it)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _stop_group(pgid: int, grace_s: float) -> None:
    """SIGTERM the process group, then SIGKILL whatever is still there after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):  # gone, or only zombies left
            return
        if _group_ends_within(pgid, grace_s):
            return


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0
