"""Result files: a run as stored, the whole result, writing without half-written files, loading with clear errors."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import socket

from llmserve.bench.errors import BenchError
from llmserve.bench.load import RunResult
from llmserve.bench.metrics import summarize


def request_counts(run: RunResult) -> dict:
    """What became of every planned request: planned = completed + failed + cancelled."""
    failed = sum(not r.success for r in run.records)
    completed = len(run.records) - failed
    return {"planned": run.num_planned, "submitted": completed + failed + run.num_cut_in_flight,
            "completed": completed, "failed": failed, "cancelled": run.num_cancelled,
            "cancelled_in_flight": run.num_cut_in_flight, "not_started": run.num_not_started}


def run_to_dict(run: RunResult, slo: dict) -> dict:
    """One run as stored in the result file: counts, aggregates, client overhead, server view, every record."""
    return {"offered_rate": "inf" if math.isinf(run.offered_rate) else run.offered_rate,
            "concurrency": run.concurrency, "wall_seconds": run.wall_seconds, "interrupted": run.interrupted,
            "requests": request_counts(run), "num_cancelled": run.num_cancelled,
            "client_overhead": {"cpu_fraction": run.client_cpu_fraction,
                                "mean_chunk_us": run.mean_chunk_seconds * 1e6},
            "aggregates": summarize(run.records, slo),
            "server_metrics": run.server_metrics,
            "records": [dataclasses.asdict(r) for r in run.records]}


def environment() -> dict:
    return {"host": socket.gethostname(), "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def build_result(label: str, config: dict, runs: list[RunResult], slo: dict, interrupted: bool) -> dict:
    """The whole result file; `interrupted` marks a partial one (Ctrl-C)."""
    return {"label": label, "interrupted": interrupted, "config": config, "environment": environment(),
            "runs": [run_to_dict(run, slo) for run in runs]}


def check_writable(path: str, flag: str) -> None:
    """Fail before the run, not after it, when `path` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise BenchError(f"{flag} {path} is a directory: give a file name")
    if not os.path.isdir(folder):
        raise BenchError(f"{flag} {path}: the directory {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise BenchError(f"{flag} {path}: the directory {folder} is not writable")


def write_text_atomic(path: str, text: str) -> None:
    """Write to a temporary name beside `path`, then rename: a reader never sees half a file."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")  # plain open: the umask decides the mode
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise BenchError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def load_result(path: str) -> dict:
    """A result file written by `bench serve`; BenchError naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except FileNotFoundError:
        raise BenchError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchError(f"{path} is not a bench result (not JSON: {exc})") from None
    except OSError as exc:
        raise BenchError(f"cannot read {path}: {exc.strerror or exc}") from None
    runs = result.get("runs") if isinstance(result, dict) else None
    if not isinstance(runs, list) or not all(isinstance(run, dict) and "aggregates" in run for run in runs):
        raise BenchError(f"{path} is not a bench result (no 'runs' with aggregates; "
                         "`llmserve bench serve --out FILE` writes one)")
    if not runs:
        raise BenchError(f"{path} holds no run (interrupted before the first one?)")
    return result
