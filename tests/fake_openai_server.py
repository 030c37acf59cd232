"""A scripted OpenAI-compatible streaming server for harness tests: known delays, errors and drops."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class FakeScript:
    """What the server does; request indices count arrivals from 0.

    `statuses`: index -> HTTP error status; `drop_after`: index -> chunks sent before the
    connection is closed; `malformed`: indices that get a non-JSON data frame; `stall`:
    index -> extra seconds before the first chunk (to trip a client timeout). `models`: what
    GET /v1/models lists (None: no such route, 404). `metrics`: serve an llmserve-shaped
    Prometheus /metrics page from the fake's own state (else 404).
    """

    first_delay: float = 0.1
    gap: float = 0.04
    tokens_per_chunk: int = 1
    send_usage: bool = True
    statuses: dict[int, int] = field(default_factory=dict)
    drop_after: dict[int, int] = field(default_factory=dict)
    malformed: set[int] = field(default_factory=set)
    stall: dict[int, float] = field(default_factory=dict)
    models: list[str] | None = field(default_factory=lambda: ["m"])
    metrics: bool = False


class FakeOpenAIServer:
    """Streams `max_tokens` chunks per request after `first_delay`, then one every `gap` seconds."""

    def __init__(self, script: FakeScript | None = None):
        self.script = script or FakeScript()
        self.num_requests = 0
        self.active = 0
        self.max_concurrent = 0
        self.bodies: list[dict] = []
        self.num_chunks = 0
        self.num_metrics_scrapes = 0
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def __aenter__(self) -> "FakeOpenAIServer":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/v1/completions", self._handle)
        if self.script.models is not None:
            app.router.add_get("/v1/models", self._models)
        if self.script.metrics:
            app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": name, "object": "model"}
                                                             for name in self.script.models]})

    async def _metrics(self, request: web.Request) -> web.Response:
        """Two KV blocks per active stream, of 64; the names and types llmserve's /metrics uses."""
        self.num_metrics_scrapes += 1
        lines = [("llmserve_requests_running", "gauge", self.active), ("llmserve_requests_waiting", "gauge", 0),
                 ("llmserve_kv_blocks_total", "gauge", 64), ("llmserve_kv_blocks_used", "gauge", 2 * self.active),
                 ("llmserve_kv_blocks_cached", "gauge", 1), ("llmserve_preemptions_total", "counter", 0),
                 ("llmserve_generation_tokens_total", "counter", self.num_chunks)]
        text = "".join(f"# TYPE {name.removesuffix('_total')} {kind}\n{name} {float(value)}\n"
                       for name, kind, value in lines)
        return web.Response(text=text, content_type="text/plain")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        index = self.num_requests
        self.num_requests += 1
        body = await request.json()
        self.bodies.append(body)
        if index in self.script.statuses:
            status = self.script.statuses[index]
            return web.json_response({"error": {"message": f"scripted {status}", "type": "fake"}}, status=status)
        self.active += 1
        self.max_concurrent = max(self.max_concurrent, self.active)
        try:
            return await self._stream(request, body, index)
        except ConnectionResetError:  # the client cancelled the request mid-stream
            return web.Response(status=499)
        finally:
            self.active -= 1

    async def _stream(self, request: web.Request, body: dict, index: int) -> web.StreamResponse:
        chat = request.path.endswith("chat/completions")
        num_chunks = int(body.get("max_tokens", 16))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(self.script.first_delay + self.script.stall.get(index, 0.0))
        if index in self.script.malformed:
            await resp.write(b"data: {not json\n\n")
            return resp
        for i in range(num_chunks):
            if i > 0:
                await asyncio.sleep(self.script.gap)
            if self.script.drop_after.get(index) == i:
                request.transport.close()  # mid-stream drop: no terminating chunk, no [DONE]
                return resp
            await resp.write(_frame(_chunk(chat, f"t{i} ")))
            self.num_chunks += 1
        usage = {"prompt_tokens": 7, "completion_tokens": num_chunks * self.script.tokens_per_chunk,
                 "total_tokens": 7 + num_chunks * self.script.tokens_per_chunk}
        if self.script.send_usage and (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(_frame({"choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _chunk(chat: bool, text: str) -> dict:
    if chat:
        return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}
    return {"object": "text_completion", "choices": [{"index": 0, "text": text}]}


def _frame(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


@contextlib.contextmanager
def server_in_thread(script: FakeScript):
    """The fake server on its own event loop thread, for the blocking CLI."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = FakeOpenAIServer(script)
    asyncio.run_coroutine_threadsafe(server.__aenter__(), loop).result(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.__aexit__(None, None, None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
