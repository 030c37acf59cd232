"""Load shapes on one event loop: fixed concurrency, Poisson or gamma arrivals, rate sweeps."""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from llmserve.bench.client import ClientStats, EndpointConfig, RequestRecord, send_request
from llmserve.bench.datasets import BenchRequest


@dataclass(slots=True)
class LoadConfig:
    """How requests are released: rate (inf = all at once), burstiness, concurrency cap, bounds."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    concurrency: int | None = None
    warmup: int = 0
    max_seconds: float | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        assert self.request_rate > 0, f"request_rate must be > 0, got {self.request_rate}"
        assert self.burstiness > 0, f"burstiness must be > 0, got {self.burstiness}"
        assert self.concurrency is None or self.concurrency >= 1, f"concurrency must be >= 1, got {self.concurrency}"
        assert self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}"


@dataclass(slots=True)
class RunResult:
    """Records of one measured run plus the client's own overhead."""

    offered_rate: float
    concurrency: int | None
    records: list[RequestRecord]
    wall_seconds: float
    client_cpu_fraction: float
    mean_chunk_seconds: float
    num_cancelled: int = 0
    extra: dict = field(default_factory=dict)


def arrival_gaps(num_requests: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds before each request: gamma(shape b, scale 1/(rate*b)); b = 1 is Poisson; inf rate is 0."""
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    return rng.gamma(burstiness, 1.0 / (rate * burstiness), size=num_requests).tolist()


def _session() -> aiohttp.ClientSession:
    # No connection cap: the load shape, not the pool, decides how many requests are in flight.
    # A fresh connection per request: reusing a keep-alive connection that the server has
    # just closed fails with "Can not write request body" (seen against llama-server),
    # which would count as a server error; a loopback connect costs well under a millisecond.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))


def _progress_bar(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return None
    return tqdm(total=total, file=sys.stderr, disable=not enabled, unit="req", leave=False)


async def _warmup(session, requests: list[BenchRequest], endpoint: EndpointConfig, num: int, tokenizer) -> None:
    """Send `num` requests one by one; their records are dropped."""
    stats = ClientStats()
    for i in range(num):
        await send_request(session, requests[i % len(requests)], endpoint, -1 - i, time.perf_counter(), stats,
                           tokenizer)


async def _dispatch(session, requests, endpoint, load: LoadConfig, origin: float, stats: ClientStats,
                    tokenizer, bar) -> list[asyncio.Task]:
    """Release requests on the arrival schedule until all are sent or the time bound passes."""
    semaphore = asyncio.Semaphore(load.concurrency) if load.concurrency else contextlib.nullcontext()
    deadline = origin + load.max_seconds if load.max_seconds else math.inf

    async def one(i: int, request: BenchRequest) -> RequestRecord:
        async with semaphore:
            record = await send_request(session, request, endpoint, i, origin, stats, tokenizer)
        if bar is not None:
            bar.update(1)
        return record

    tasks = []
    next_time = origin
    for i, (gap, request) in enumerate(zip(arrival_gaps(len(requests), load.request_rate, load.burstiness,
                                                        load.seed), requests)):
        next_time += gap
        if next_time >= deadline:
            break
        delay = next_time - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, request)))
    return tasks


async def run_load(requests: list[BenchRequest], endpoint: EndpointConfig, load: LoadConfig,
                   tokenizer=None) -> RunResult:
    """Warm up, then run one measured load over `requests`, bounded by count and `max_seconds`."""
    assert requests, "no requests to send"
    async with _session() as session:
        await _warmup(session, requests, endpoint, load.warmup, tokenizer)
        stats, bar = ClientStats(), _progress_bar(len(requests), load.progress)
        cpu0, origin = time.process_time(), time.perf_counter()
        tasks = await _dispatch(session, requests, endpoint, load, origin, stats, tokenizer, bar)
        records, num_cancelled = await _collect(tasks, load, origin)
        wall, cpu = time.perf_counter() - origin, time.process_time() - cpu0
        if bar is not None:
            bar.close()
    return RunResult(load.request_rate, load.concurrency, records, wall, cpu / wall if wall > 0 else 0.0,
                     stats.chunk_seconds / stats.num_chunks if stats.num_chunks else 0.0, num_cancelled)


async def _collect(tasks: list[asyncio.Task], load: LoadConfig, origin: float) -> tuple[list[RequestRecord], int]:
    """Wait for the sent requests; ones still running at the time bound are cancelled and dropped."""
    if not tasks:
        return [], 0
    timeout = None if not load.max_seconds else max(0.0, origin + load.max_seconds - time.perf_counter())
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    records = sorted((t.result() for t in done), key=lambda r: r.request_id)
    return records, len(pending)


async def run_sweep(requests: list[BenchRequest], endpoint: EndpointConfig, rates: list[float], load: LoadConfig,
                    tokenizer=None) -> list[RunResult]:
    """One run per offered rate, in order; warm-up only before the first."""
    results = []
    for i, rate in enumerate(rates):
        run_config = LoadConfig(rate, load.burstiness, load.concurrency, load.warmup if i == 0 else 0,
                                load.max_seconds, load.seed, load.progress)
        results.append(await run_load(requests, endpoint, run_config, tokenizer))
    return results
