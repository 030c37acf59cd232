"""Load shapes on one event loop: fixed concurrency, Poisson or gamma arrivals, rate sweeps; stoppable."""

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
from llmserve.bench.scrape import ServerMonitor


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
    """Records of one measured run, the fate of every planned request, and the client's own overhead.

    Each planned request either finished (a record, success or error), was cut in flight (sent, then
    cancelled by `max_seconds` or a stop) or never started (its turn came after the bound or the stop).
    """

    offered_rate: float
    concurrency: int | None
    records: list[RequestRecord]
    wall_seconds: float
    client_cpu_fraction: float
    mean_chunk_seconds: float
    num_planned: int = 0
    num_cut_in_flight: int = 0
    num_not_started: int = 0
    interrupted: bool = False
    server_metrics: dict | None = None

    @property
    def num_cancelled(self) -> int:
        """Planned requests that never finished: cut in flight or never started."""
        return self.num_cut_in_flight + self.num_not_started


@dataclass(slots=True)
class _Flight:
    """Requests released so far: their tasks by request index, and which got past the concurrency gate."""

    tasks: dict[int, asyncio.Task] = field(default_factory=dict)
    started: set[int] = field(default_factory=set)


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


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True as soon as `stop` is set."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
        return True
    except asyncio.TimeoutError:
        return False


async def _done_unless_stopped(future: asyncio.Future, stop: asyncio.Event, timeout: float | None = None) -> bool:
    """Wait for `future` until it is done, `stop` is set or `timeout` passes; whether it is done."""
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({future, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    return future.done()


async def _cancel(tasks) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _warmup(send, requests: list[BenchRequest], num: int, stop: asyncio.Event) -> None:
    """Send `num` requests one by one (their records are dropped) unless `stop` comes first."""
    for i in range(num):
        task = asyncio.create_task(send(-1 - i, requests[i % len(requests)], time.perf_counter()))
        if not await _done_unless_stopped(task, stop):
            await _cancel([task])
            return


async def _dispatch(send, requests: list[BenchRequest], load: LoadConfig, origin: float, bar,
                    stop: asyncio.Event) -> _Flight:
    """Release requests on the arrival schedule until all are sent, the time bound passes or `stop` is set."""
    semaphore = asyncio.Semaphore(load.concurrency) if load.concurrency else contextlib.nullcontext()
    deadline = origin + load.max_seconds if load.max_seconds else math.inf
    flight = _Flight()

    async def one(i: int, request: BenchRequest) -> RequestRecord:
        async with semaphore:
            flight.started.add(i)
            record = await send(i, request, origin)
        if bar is not None:
            bar.update(1)
        return record

    next_time = origin
    for i, (gap, request) in enumerate(zip(arrival_gaps(len(requests), load.request_rate, load.burstiness,
                                                        load.seed), requests)):
        next_time += gap
        if next_time >= deadline or stop.is_set():
            break
        delay = next_time - time.perf_counter()
        if delay > 0 and await _stopped_within(stop, delay):
            break
        flight.tasks[i] = asyncio.create_task(one(i, request))
    return flight


async def run_load(requests: list[BenchRequest], endpoint: EndpointConfig, load: LoadConfig, tokenizer=None, *,
                   stop: asyncio.Event | None = None, monitor: ServerMonitor | None = None) -> RunResult:
    """Warm up, then run one measured load over `requests`, bounded by count, `max_seconds` and `stop`.

    Setting `stop` (Ctrl-C) ends the run early: nothing more is sent, requests in flight are
    cancelled, and the result keeps what finished, marked interrupted. `monitor` samples the
    server's own metrics during the measured part.
    """
    assert requests, "no requests to send"
    stop = stop or asyncio.Event()
    async with _session() as session:
        def sender(stats: ClientStats):
            return lambda i, request, origin: send_request(session, request, endpoint, i, origin, stats, tokenizer)

        await _warmup(sender(ClientStats()), requests, load.warmup, stop)
        stats, bar = ClientStats(), _progress_bar(len(requests), load.progress)
        send = sender(stats)
        cpu0, origin = time.process_time(), time.perf_counter()
        if monitor is not None:
            monitor.start(session, origin)
        try:
            flight = await _dispatch(send, requests, load, origin, bar, stop)
            records, num_cut = await _collect(flight, load, origin, stop)
            wall, cpu = time.perf_counter() - origin, time.process_time() - cpu0
        finally:
            server_metrics = await monitor.stop(session, origin) if monitor is not None else None
            if bar is not None:
                bar.close()
    return RunResult(load.request_rate, load.concurrency, records, wall, cpu / wall if wall > 0 else 0.0,
                     stats.chunk_seconds / stats.num_chunks if stats.num_chunks else 0.0,
                     num_planned=len(requests), num_cut_in_flight=num_cut,
                     num_not_started=len(requests) - len(records) - num_cut, interrupted=stop.is_set(),
                     server_metrics=server_metrics)


async def _collect(flight: _Flight, load: LoadConfig, origin: float,
                   stop: asyncio.Event) -> tuple[list[RequestRecord], int]:
    """Wait for the released requests until all end, the time bound passes or `stop` is set; cancel the rest.

    Returns the finished records and how many requests were cut in flight (sent, not finished).
    """
    if flight.tasks:
        timeout = None if not load.max_seconds else max(0.0, origin + load.max_seconds - time.perf_counter())
        all_done = asyncio.ensure_future(asyncio.wait(flight.tasks.values()))
        await _done_unless_stopped(all_done, stop, timeout)
        await _cancel([all_done])
    pending = {i for i, task in flight.tasks.items() if not task.done()}
    await _cancel([flight.tasks[i] for i in pending])
    records = sorted((task.result() for i, task in flight.tasks.items() if i not in pending),
                     key=lambda r: r.request_id)
    return records, len(pending & flight.started)


async def run_sweep(requests: list[BenchRequest], endpoint: EndpointConfig, rates: list[float], load: LoadConfig,
                    tokenizer=None, *, stop: asyncio.Event | None = None,
                    monitor: ServerMonitor | None = None) -> list[RunResult]:
    """One run per offered rate, in order; warm-up only before the first; a stop ends the sweep."""
    stop = stop or asyncio.Event()
    results = []
    for i, rate in enumerate(rates):
        if stop.is_set():
            break
        run_config = LoadConfig(rate, load.burstiness, load.concurrency, load.warmup if i == 0 else 0,
                                load.max_seconds, load.seed, load.progress)
        results.append(await run_load(requests, endpoint, run_config, tokenizer, stop=stop, monitor=monitor))
    return results
