"""The server-side view: llmserve's Prometheus /metrics scraped at a fixed interval during each run."""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

# Series name in the result file -> Prometheus sample name on llmserve's /metrics page.
SAMPLE_NAMES = {
    "requests_running": "llmserve_requests_running",
    "requests_waiting": "llmserve_requests_waiting",
    "kv_blocks_total": "llmserve_kv_blocks_total",
    "kv_blocks_used": "llmserve_kv_blocks_used",
    "kv_blocks_cached": "llmserve_kv_blocks_cached",
    "preemptions": "llmserve_preemptions_total",
    "generation_tokens": "llmserve_generation_tokens_total",
}
SERIES_NAMES = (*SAMPLE_NAMES, "kv_blocks_free")
SCRAPE_TIMEOUT_S = 5.0


class NoServerMetrics(Exception):
    """The page is missing, is not Prometheus text, or has no llmserve metrics."""


def parse_llmserve_metrics(text: str) -> dict[str, float]:
    """The llmserve series of one /metrics page (free blocks derived); raises NoServerMetrics."""
    totals: dict[str, float] = {}
    wanted = {sample: name for name, sample in SAMPLE_NAMES.items()}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in wanted:
                    totals[wanted[sample.name]] = totals.get(wanted[sample.name], 0.0) + sample.value
    except ValueError as exc:
        raise NoServerMetrics(f"not Prometheus text ({exc})") from None
    missing = [name for name in SAMPLE_NAMES if name not in totals]
    if missing:
        raise NoServerMetrics("no llmserve metrics (a different server?)" if len(missing) == len(SAMPLE_NAMES)
                              else f"no {', '.join(SAMPLE_NAMES[m] for m in missing)}")
    # A block is in use, cached (free but holding a reusable prefix) or free and empty.
    totals["kv_blocks_free"] = totals["kv_blocks_total"] - totals["kv_blocks_used"] - totals["kv_blocks_cached"]
    return totals


class ServerMonitor:
    """Samples /metrics every `interval_s` while a run lasts; after one failed first sample it warns
    once and stays off for every later run (a peer without llmserve's /metrics)."""

    def __init__(self, url: str, interval_s: float, warn: Callable[[str], None]):
        assert interval_s > 0, f"the scrape interval must be > 0, got {interval_s}"
        self.url, self.interval_s, self.warn = url, interval_s, warn
        self.available = True
        self._task: asyncio.Task | None = None
        self._series: dict | None = None

    def start(self, session: aiohttp.ClientSession, origin: float) -> None:
        """Begin sampling; times are seconds since `origin` (a perf_counter value), like request starts."""
        if not self.available:
            return
        self._series = {"url": self.url, "interval_s": self.interval_s, "t": [],
                        **{name: [] for name in SERIES_NAMES}}
        self._task = asyncio.create_task(self._sample_forever(session, origin))

    async def stop(self, session: aiohttp.ClientSession, origin: float) -> dict | None:
        """End sampling with one last sample (the state the run left behind); the run's time series
        (JSON-ready columns), or None when there is none."""
        if self._task is None:
            return None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        if not self.available:
            return None
        tick = time.perf_counter()
        try:
            self._append(await self._scrape(session), tick - origin)
        except NoServerMetrics as exc:
            if not self._series["t"]:  # a run too short for a first sample: this one decides
                self._give_up(str(exc))
                return None
        return self._series

    async def _sample_forever(self, session: aiohttp.ClientSession, origin: float) -> None:
        first = True
        while True:
            tick = time.perf_counter()
            try:
                self._append(await self._scrape(session), tick - origin)
            except NoServerMetrics as exc:
                # Only the first sample decides; later failures (a busy server timing out) lose one sample.
                if first:
                    self._give_up(str(exc))
                    return
            first = False
            await asyncio.sleep(max(0.0, tick + self.interval_s - time.perf_counter()))

    async def _scrape(self, session: aiohttp.ClientSession) -> dict[str, float]:
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
        try:
            async with session.get(self.url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise NoServerMetrics(f"HTTP {resp.status}")
                text = await resp.text()
        except (asyncio.TimeoutError, aiohttp.ClientError, UnicodeDecodeError) as exc:
            raise NoServerMetrics(f"{type(exc).__name__}: {exc}") from None
        return parse_llmserve_metrics(text)

    def _append(self, values: dict[str, float], t: float) -> None:
        self._series["t"].append(round(t, 4))
        for name in SERIES_NAMES:
            self._series[name].append(values[name])

    def _give_up(self, reason: str) -> None:
        self.available = False
        self.warn(f"no server-side metrics from {self.url} ({reason}): the report leaves them out")
