"""Server-Sent Events over aiohttp's StreamResponse: `data: {json}` frames, then `data: [DONE]`."""

from __future__ import annotations

import json

from aiohttp import web

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies must not hold frames back
}


class SSEStream:
    """One event stream; `send` raises ConnectionResetError once the client has gone."""

    def __init__(self, request: web.Request):
        self.request = request
        self.response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        self.num_events = 0

    async def open(self) -> None:
        await self.response.prepare(self.request)

    async def send(self, data: dict) -> None:
        frame = b"data: " + json.dumps(data, ensure_ascii=False).encode("utf-8") + b"\n\n"
        await self.response.write(frame)
        self.num_events += 1

    async def close(self) -> None:
        """End the stream the way OpenAI clients expect."""
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
