"""One streaming OpenAI request over aiohttp, timed chunk by chunk into a `RequestRecord`."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

from llmserve.bench.datasets import BenchRequest


@dataclass(slots=True)
class EndpointConfig:
    """Where and how to send requests."""

    base_url: str
    model: str
    endpoint: str = "chat"
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = False
    request_timeout: float = 600.0

    def __post_init__(self):
        assert self.endpoint in ("chat", "completions"), f"endpoint must be chat or completions, not {self.endpoint}"

    @property
    def v1_url(self) -> str:
        """`base_url` ending in /v1, whether or not it was given with it."""
        base = self.base_url.rstrip("/")
        return base if base.endswith("/v1") else base + "/v1"

    @property
    def url(self) -> str:
        """Full URL of the generation endpoint."""
        return self.v1_url + ("/chat/completions" if self.endpoint == "chat" else "/completions")

    @property
    def metrics_url(self) -> str:
        """Where a Prometheus /metrics page would be: at the server root, beside /v1."""
        return self.v1_url[:-len("/v1")] + "/metrics"

    def headers(self) -> dict:
        """Request headers: JSON, plus the bearer token when an API key is set."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


@dataclass(slots=True)
class RequestRecord:
    """Timings of one request, in seconds; `start` is relative to the run's origin."""

    request_id: int
    start: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    output_tokens_source: str = "chunks"
    prompt_tokens: int | None = None
    error_kind: str | None = None
    error_message: str | None = None

    @property
    def success(self) -> bool:
        return self.error_kind is None

    @property
    def itl(self) -> list[float]:
        """Gaps between consecutive content chunks."""
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]


@dataclass(slots=True)
class ClientStats:
    """The client's own cost: time spent handling stream lines."""

    num_chunks: int = 0
    chunk_seconds: float = 0.0


def build_payload(request: BenchRequest, config: EndpointConfig) -> dict:
    """The JSON body for `request`: streaming, with usage asked for."""
    body = {"model": config.model, "max_tokens": request.max_tokens, "temperature": config.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.endpoint == "completions":
        body["prompt"] = request.prompt
    elif isinstance(request.prompt, str):
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        assert request.prompt and isinstance(request.prompt[0], dict), "chat needs text or messages, not token ids"
        body["messages"] = request.prompt
    return body


class _StreamState:
    """What the SSE stream has told us so far."""

    __slots__ = ("text", "usage", "done", "chunk_times", "error")

    def __init__(self):
        self.text: list[str] = []
        self.usage: dict | None = None
        self.done = False
        self.chunk_times: list[float] = []
        self.error: str | None = None


def _content_of(obj: dict, endpoint: str) -> str:
    choices = obj.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if endpoint == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def _handle_line(line: bytes, state: _StreamState, endpoint: str, now: float) -> None:
    """Fold one SSE line into `state`; raises ValueError on malformed data."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return  # blank separators, comments and `event:` lines carry no tokens
    data = line[5:].strip()
    if data == b"[DONE]":
        state.done = True
        return
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object: {data[:100]!r}")
    if "error" in obj:
        state.error = str(obj["error"])[:500]
        return
    if obj.get("usage"):
        state.usage = obj["usage"]
    content = _content_of(obj, endpoint)
    if content:
        state.text.append(content)
        state.chunk_times.append(now)


async def send_request(session: aiohttp.ClientSession, request: BenchRequest, config: EndpointConfig,
                       request_id: int, origin: float, stats: ClientStats, tokenizer=None) -> RequestRecord:
    """Send one streaming request; never raises for server or network faults, records them instead."""
    record = RequestRecord(request_id, prompt_tokens=request.prompt_len)
    state = _StreamState()
    start = time.perf_counter()
    record.start = start - origin
    try:
        await _stream(session, request, config, state, stats)
    except aiohttp.ClientResponseError as exc:
        record.error_kind, record.error_message = f"http_{exc.status}", exc.message[:500]
    except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
        record.error_kind, record.error_message = "timeout", str(exc)[:500] or "request timed out"
    except aiohttp.ClientConnectorError as exc:
        record.error_kind, record.error_message = "connect", str(exc)[:500]
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionError) as exc:
        record.error_kind, record.error_message = "disconnect", f"{type(exc).__name__}: {exc}"[:500]
    except (ValueError, UnicodeDecodeError) as exc:
        record.error_kind, record.error_message = "malformed", str(exc)[:500]
    except aiohttp.ClientError as exc:  # anything else aiohttp raises must not abort the whole run
        record.error_kind, record.error_message = "client_error", f"{type(exc).__name__}: {exc}"[:500]
    _finish(record, state, start, tokenizer)
    return record


async def _stream(session, request, config, state: _StreamState, stats: ClientStats) -> None:
    """POST and read the event stream into `state`."""
    timeout = aiohttp.ClientTimeout(total=config.request_timeout)
    async with session.post(config.url, json=build_payload(request, config), headers=config.headers(),
                            timeout=timeout) as resp:
        if resp.status != 200:
            body = await resp.text()
            raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status, message=body)
        while not state.done:
            line = await resp.content.readline()
            if not line:
                break
            now = time.perf_counter()
            _handle_line(line, state, config.endpoint, now)
            stats.num_chunks += 1
            stats.chunk_seconds += time.perf_counter() - now


def _finish(record: RequestRecord, state: _StreamState, start: float, tokenizer) -> None:
    """Derive latencies and token counts from the stream state."""
    end = time.perf_counter()
    record.e2e = end - start
    record.chunk_times = [t - start for t in state.chunk_times]
    record.ttft = record.chunk_times[0] if record.chunk_times else None
    if record.error_kind is None and state.error is not None:
        record.error_kind, record.error_message = "server_error", state.error
    elif record.error_kind is None and not state.done:
        record.error_kind, record.error_message = "disconnect", "stream ended before [DONE]"
    _count_tokens(record, state, tokenizer)


def _count_tokens(record: RequestRecord, state: _StreamState, tokenizer) -> None:
    usage = state.usage or {}
    if usage.get("completion_tokens") is not None:
        record.output_tokens, record.output_tokens_source = int(usage["completion_tokens"]), "usage"
    elif tokenizer is not None:
        ids = tokenizer.encode("".join(state.text), add_special_tokens=False)
        record.output_tokens, record.output_tokens_source = len(ids), "tokenizer"
    else:
        record.output_tokens, record.output_tokens_source = len(state.chunk_times), "chunks"
    if usage.get("prompt_tokens") is not None:
        record.prompt_tokens = int(usage["prompt_tokens"])
