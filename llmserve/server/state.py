"""Typed keys for what the app and each request carry, and the per-request statistics."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web

from llmserve.frontend.engine_client import EngineClient, RequestOutput
from llmserve.server.config import ServerConfig
from llmserve.server.generation import InflightRuns
from llmserve.server.metrics import ServerMetrics
from llmserve.server.models import ModelRegistry
from llmserve.server.tokenizing import TokenizingWorker


@dataclass(slots=True)
class RequestStats:
    """Timings and token counts of one HTTP request, for the access log and the histograms."""

    request_id: str
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    client_gone: bool = False  # the client disconnected before the response ended
    error_status: int | None = None  # an error sent inside a 200 stream
    _last_token: dict[int, float] = field(default_factory=dict)

    def on_output(self, index: int, output: RequestOutput) -> None:
        """Record one engine delta of choice `index`."""
        now = time.monotonic()
        if output.new_token_ids:
            if self.first_token is None:
                self.first_token = now
            last = self._last_token.get(index)
            if last is not None:
                self.inter_token_latencies.append(now - last)
            self._last_token[index] = now
            self.num_output_tokens += len(output.new_token_ids)
        if output.finished:
            self.finish_reasons.append(output.finish_reason)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


ENGINE = web.AppKey("engine", EngineClient)  # the first model's engine client, when create_app was given one
MODELS = web.AppKey("models", ModelRegistry)
CONFIG = web.AppKey("config", ServerConfig)
METRICS = web.AppKey("metrics", ServerMetrics)
INFLIGHT = web.AppKey("inflight", InflightRuns)
SHUTTING_DOWN = web.AppKey("shutting_down", asyncio.Event)
ABORT_NOW = web.AppKey("abort_now", asyncio.Event)  # set by a second signal: stop waiting, abort in-flight requests
STARTED = web.AppKey("started", int)  # unix time, the `created` of the model card
TOKENIZING = web.AppKey("tokenizing", TokenizingWorker)
STATS = web.RequestKey("stats", RequestStats)
