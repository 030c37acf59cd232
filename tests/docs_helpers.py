"""Reading the repository's markdown for tests/test_docs.py: fenced blocks, links, and why a link
or a quoted path would break in a fresh clone."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Where runnable blocks live (the brief of the docs issue); other markdown is only link-checked.
RUNNABLE_DOCS = ["README.md", "docs/*.md", "bench/README.md", "bench/workloads.md"]
# Public pages the docs may link to, listed so that every new one is a deliberate choice.
PUBLIC_LINKS: frozenset[str] = frozenset()
# Text that points outside a clone: the internal notes folder, and absolute local paths.
FORBIDDEN = [
    (re.compile(r"\.\./shared\b"), "a path into ../shared (outside the repository)"),
    (re.compile(r"(?<![\w./-])shared/(?:notes|DESIGN|STYLE|WORKLOADS)"), "a path into the internal shared/ folder"),
    (re.compile(r"(?<![\w.-])/(?:work|home|Users|root)/"), "an absolute local path"),
]
FENCE = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?(?P<target>[^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(?P<target>\S+?)>?(?:\s|$)", re.M)
AUTOLINK = re.compile(r"<(?P<target>[a-z][a-z0-9+.-]*:[^\s>]+)>", re.I)
CODE_SPAN = re.compile(r"(`+)(?P<code>.+?)\1", re.S)
PATH_LIKE = re.compile(r"^[\w.-]+(?:/[\w.-]+)+/?$")  # "a/b.py", not "a/..." nor "a b/c"


@dataclass(frozen=True, slots=True)
class Block:
    """One fenced code block of a markdown file."""

    path: Path
    line: int  # 1-based line of the opening fence
    info: str
    text: str

    @property
    def words(self) -> list[str]:
        return self.info.split()

    @property
    def runnable(self) -> bool:
        return len(self.words) > 1 and self.words[0] in ("bash", "python") and "runnable" in self.words[1:]

    @property
    def slow(self) -> bool:
        return "slow" in self.words[1:]

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


# ---- reading markdown ---------------------------------------------------------------------
@functools.cache
def tracked_files() -> tuple[str, ...]:
    """Paths git tracks in the repository."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode()
    return tuple(name for name in listed.split("\0") if name)


def markdown_files() -> list[Path]:
    """Tracked and new (not ignored) markdown files, without the benchmark results' notes."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "*.md"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode()
    names = sorted({name for name in listed.split("\0") if name and not name.startswith("bench/results/")})
    return [REPO / name for name in names if (REPO / name).exists()]


def split_fences(text: str, path: Path) -> tuple[str, list[Block]]:
    """(the text with every fenced block blanked out, the blocks)."""
    prose, blocks, lines = [], [], text.split("\n")
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            prose.append(lines[index])
            index += 1
            continue
        fence, body_start = opening["fence"], index + 1
        end = body_start
        while end < len(lines) and not re.match(rf"^ {{0,3}}{fence[0]}{{{len(fence)},}}\s*$", lines[end]):
            end += 1
        blocks.append(Block(path, index + 1, opening["info"].strip(), "\n".join(lines[body_start:end]) + "\n"))
        prose.extend([""] * (min(end, len(lines) - 1) - index + 1))
        index = end + 1
    return "\n".join(prose), blocks


def blocks_of(pattern: str) -> list[Block]:
    """The fenced blocks of the markdown files matching `pattern` (relative to the repository)."""
    return [b for path in sorted(REPO.glob(pattern)) for b in split_fences(path.read_text(), path)[1]]


def runnable_blocks() -> list[Block]:
    """The blocks tests/test_docs.py runs."""
    return [block for pattern in RUNNABLE_DOCS for block in blocks_of(pattern) if block.runnable]


def link_targets(prose: str) -> list[str]:
    """Targets of inline links, images, reference definitions and autolinks (code spans skipped)."""
    prose = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), prose)
    found = [m["target"] for m in LINK.finditer(prose)] + [m["target"] for m in REFERENCE.finditer(prose)]
    return found + [m["target"] for m in AUTOLINK.finditer(prose)]


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown text."""
    prose, _ = split_fences(text, Path())
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.M):
        heading = re.sub(r"`|\*\*|__", "", re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading))
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


# ---- checking one link ------------------------------------------------------------------------
def link_problem(source: Path, target: str) -> str | None:
    """Why `target`, linked from `source`, is not a link inside the repository; None if it is."""
    scheme = urllib.parse.urlsplit(target).scheme.lower()
    if scheme in ("http", "https", "mailto"):
        return None if target in PUBLIC_LINKS else "an outside link not listed in PUBLIC_LINKS"
    if scheme:
        return f"a {scheme}: link"
    path_part, _, anchor = target.partition("#")
    path_part = urllib.parse.unquote(path_part.split("?")[0])
    if path_part.startswith("/"):
        return "an absolute path (use a path relative to this file)"
    resolved = Path(os.path.normpath(source.parent / path_part)) if path_part else source
    if resolved != REPO and REPO not in resolved.parents:
        return "a path outside the repository"
    if not resolved.exists():
        return "a file that does not exist"
    if anchor and resolved.suffix == ".md" and anchor not in github_anchors(resolved.read_text()):
        return f"no heading with the anchor #{anchor} in {resolved.relative_to(REPO)}"
    return None


def code_path_problem(source: Path, code: str) -> str | None:
    """Why a repository path quoted in a code span is wrong; None when it is fine or not a path."""
    if "../" in code:
        resolved = Path(os.path.normpath(source.parent / code.split()[0]))
        if REPO not in resolved.parents:
            return "a path outside the repository"
    if not PATH_LIKE.match(code) or "..." in code or code.split("/")[0] not in checked_roots():
        return None
    if (REPO / code).exists() or (source.parent / code).exists():
        return None
    return "a repository path that does not exist"


def checked_roots() -> set[str]:
    """Tracked top-level folders whose paths must exist (checkpoints/ holds gitignored models)."""
    return {name.split("/")[0] for name in tracked_files() if "/" in name} - {"checkpoints"}


def problems_in(path: Path) -> list[str]:
    """Every link or quoted path in `path` that would break in a clone, one line each."""
    text = path.read_text()
    prose, _ = split_fences(text, path)
    where = path.relative_to(REPO)
    found = [f"{where}: {m.group(0)!r}: {why}" for pattern, why in FORBIDDEN for m in pattern.finditer(text)]
    found += [f"{where}: ({target}): {why}" for target in link_targets(prose)
              if (why := link_problem(path, target)) is not None]
    found += [f"{where}: `{m['code']}`: {why}" for m in CODE_SPAN.finditer(prose)
              if (why := code_path_problem(path, m["code"])) is not None]
    return found
