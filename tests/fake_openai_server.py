"""A scripted OpenAI-compatible streaming server for harness tests: known delays, errors and drops."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class FakeScript:
    """What the server does; request indices count arrivals from 0.

    `statuses`: index -> HTTP error status; `drop_after`: index -> chunks sent before the
    connection is closed; `malformed`: indices that get a non-JSON data frame; `stall`:
    index -> extra seconds before the first chunk (to trip a client timeout).
    """

    first_delay: float = 0.1
    gap: float = 0.04
    tokens_per_chunk: int = 1
    send_usage: bool = True
    statuses: dict[int, int] = field(default_factory=dict)
    drop_after: dict[int, int] = field(default_factory=dict)
    malformed: set[int] = field(default_factory=set)
    stall: dict[int, float] = field(default_factory=dict)


class FakeOpenAIServer:
    """Streams `max_tokens` chunks per request after `first_delay`, then one every `gap` seconds."""

    def __init__(self, script: FakeScript | None = None):
        self.script = script or FakeScript()
        self.num_requests = 0
        self.active = 0
        self.max_concurrent = 0
        self.bodies: list[dict] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def __aenter__(self) -> "FakeOpenAIServer":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/v1/completions", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()

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
