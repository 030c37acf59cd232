"""`llmserve chat`: an interactive terminal chat against any OpenAI-compatible server.

Replies stream as they are generated; the conversation is kept and sent each turn.
Commands: /exit (or Ctrl-D), /reset (forget the conversation), /help. Ctrl-C stops
the current reply (the server aborts it) without leaving.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp

HELP = "commands: /exit quits, /reset forgets the conversation, /help shows this; Ctrl-C stops a reply"


@dataclass(slots=True)
class ChatClientConfig:
    """Where the server is and how to sample."""

    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: str | None = None
    model: str | None = None  # None: the first model the server lists
    system: str | None = None
    temperature: float = 0.7
    max_tokens: int = 512


@dataclass(slots=True)
class ChatSession:
    """The conversation so far, in OpenAI `messages` form."""

    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []


class ChatClient:
    """Streams chat replies from the server over one aiohttp session."""

    def __init__(self, config: ChatClientConfig, session: aiohttp.ClientSession):
        self.config = config
        self.session = session
        self.headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}

    def _url(self, path: str) -> str:
        return self.config.base_url.rstrip("/") + path

    async def model(self) -> str:
        """The configured model, or the first one the server lists."""
        if self.config.model:
            return self.config.model
        async with self.session.get(self._url("/models"), headers=self.headers) as response:
            await _raise_for_error(response)
            return (await response.json())["data"][0]["id"]

    async def stream_reply(self, model: str, messages: list[dict]) -> AsyncIterator[str]:
        """Yield the reply's text deltas as the server sends them."""
        body = {"model": model, "messages": messages, "stream": True,
                "temperature": self.config.temperature, "max_tokens": self.config.max_tokens}
        async with self.session.post(self._url("/chat/completions"), json=body, headers=self.headers) as response:
            await _raise_for_error(response)
            async for data in _sse_data(response):
                if "error" in data:
                    raise RuntimeError(data["error"].get("message", "server error"))
                for choice in data.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        yield text


async def _sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The JSON payloads of an event stream, until `data: [DONE]`."""
    async for raw in response.content:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)


async def _raise_for_error(response: aiohttp.ClientResponse) -> None:
    if response.status >= 400:
        try:
            message = (await response.json())["error"]["message"]
        except (aiohttp.ContentTypeError, KeyError, TypeError, ValueError):
            message = await response.text()
        raise RuntimeError(f"HTTP {response.status}: {message}")


def run_chat(config: ChatClientConfig, read_line=input, write=sys.stdout.write) -> int:
    """The read-reply loop; returns the process exit code."""
    try:
        model = asyncio.run(_with_client(config, lambda client: client.model()))
    except (aiohttp.ClientError, RuntimeError, OSError) as exc:
        write(f"cannot reach {config.base_url}: {exc}\n")
        return 1
    write(f"chatting with {model} at {config.base_url}; {HELP}\n")
    chat = ChatSession(config.system)
    while (line := _prompt(read_line, write)) is not None:
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            chat.reset()
        elif line == "/help":
            write(HELP + "\n")
        elif line:
            _turn(config, model, chat, line, write)
    return 0


def _prompt(read_line, write) -> str | None:
    try:
        return read_line("you> ").strip()
    except (EOFError, KeyboardInterrupt):
        write("\n")
        return None


async def _with_client(config: ChatClientConfig, use):
    async with aiohttp.ClientSession() as session:
        return await use(ChatClient(config, session))


def _turn(config: ChatClientConfig, model: str, chat: ChatSession, line: str, write) -> None:
    """One exchange: the user's line, then the streamed reply (kept, even if stopped by Ctrl-C)."""
    chat.messages.append({"role": "user", "content": line})
    reply: list[str] = []

    async def stream(client: ChatClient) -> None:
        async for text in client.stream_reply(model, chat.messages):
            reply.append(text)
            write(text)
            sys.stdout.flush()

    write("assistant> ")
    try:
        asyncio.run(_with_client(config, stream))
    except KeyboardInterrupt:  # closing the connection makes the server abort the reply
        write(" [stopped]")
    except (aiohttp.ClientError, RuntimeError, OSError) as exc:
        write(f"\n[error: {exc}]")
    write("\n")
    if reply:
        chat.messages.append({"role": "assistant", "content": "".join(reply)})
    else:
        chat.messages.pop()  # keep user and assistant turns alternating
