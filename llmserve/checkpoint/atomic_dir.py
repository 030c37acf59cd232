"""Output folders written under a temporary name and renamed into place when complete.

An interrupted or failed writer (Ctrl-C included) leaves nothing behind: readers see no output or a
whole one. Finished outputs get the permissions a plain `mkdir`/`open` gives under the umask, not the
0700/0600 that `tempfile` and safetensors use.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path


def current_umask() -> int:
    """The process umask, read from /proc where possible (setting it to read it races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_as_created(path: str | Path) -> None:
    """Give `path` the mode `mkdir`/`open` would give it under the umask (0777 or 0666 minus the umask)."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


def existing_ancestor(path: str | Path) -> Path:
    """`path` itself when it exists, else its nearest existing ancestor."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def make_dirs(path: str | Path) -> list[Path]:
    """Create `path` and its missing ancestors; return the created ones, outermost first.

    Raises NotADirectoryError naming the culprit when an existing ancestor is a file.
    """
    path = Path(os.path.abspath(path))  # '..' resolved lexically, so each ancestor is a real folder
    anchor = existing_ancestor(path)
    if not anchor.is_dir():
        raise NotADirectoryError(f"cannot create {path}: {anchor} is a file, not a directory")
    missing = [path, *path.parents][: len(path.parts) - len(anchor.parts)]
    for folder in reversed(missing):
        folder.mkdir()
    return list(reversed(missing))


def remove_empty_dirs(folders: list[Path]) -> None:
    """Remove those of `folders` (outermost first, as `make_dirs` returns them) that are still empty."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):  # not empty: something else lives there now
            folder.rmdir()


@contextlib.contextmanager
def staged_dir(final: str | Path, staging_root: str | Path | None = None,
               prefix: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder in `staging_root` (default: beside `final`); publish it as `final`
    when the block completes (see `publish`), remove it when the block raises (Ctrl-C included).

    `final`'s parent folders are created only at publication, so a failed writer leaves no empty parents.
    """
    final = Path(final)
    root = Path(staging_root) if staging_root is not None else final.parent
    created = make_dirs(root)
    staging = Path(tempfile.mkdtemp(prefix=prefix or f".{final.name}.partial-", dir=root))
    try:
        chmod_as_created(staging)
        yield staging
        created += make_dirs(final.parent)
        publish(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_empty_dirs(created)
        raise


def publish(staging: Path, final: Path) -> None:
    """Rename `staging` onto `final`; a non-empty `final` is moved aside first and deleted afterwards.

    Both renames run with SIGINT/SIGTERM held, so Ctrl-C never lands between them (it is delivered
    right after, with the new output complete).
    """
    aside = staging.with_name(f"{staging.name}.replaced")
    moved = False
    try:
        with _signals_held():
            moved = final.is_dir() and any(final.iterdir())
            if moved:
                os.rename(final, aside)
            try:
                os.replace(staging, final)  # rename(2) replaces an empty folder in one step
            except OSError:
                if moved:
                    os.rename(aside, final)
                    moved = False
                raise
    finally:
        if moved:
            shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: renames run unprotected
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
