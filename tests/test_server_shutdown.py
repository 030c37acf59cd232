"""`llmserve serve` as a real process: its banner, SIGINT/SIGTERM drains, a second signal aborts, and exit.

The process serves a tiny random LLaMA saved with the SmolLM2 tokenizer, so it starts in seconds.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import aiohttp
import pytest

from llmserve.cli import main
from llmserve.server.app import ABORT_GRACE_S, RUNNER_SHUTDOWN_S
from llmserve.server.config import ServerConfig
from tests.conftest import make_hf_llama
from tests.server_helpers import free_port, metric_values

USER = [{"role": "user", "content": "Hello there."}]
LONG_STREAM = {"messages": USER, "max_tokens": 900, "ignore_eos": True, "stream": True}
KUBERNETES_GRACE_S = 30.0
PROCESS_EXIT_S = 10.0  # interpreter teardown after torch and transformers: seconds on a loaded 2-core machine


@pytest.fixture(scope="module")
def tiny_checkpoint(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny-llama"
    hf = make_hf_llama(0, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       max_position_embeddings=1024)
    hf.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


class ServeProcess:
    """`llmserve serve` in a subprocess; its stderr is collected line by line as it arrives."""

    def __init__(self, checkpoint, *flags: str):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmserve.cli", "serve", "--model", str(checkpoint), "--port", str(self.port),
             "--num-blocks", "128", "--no-access-log", *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def v1(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_for_line(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((line for line in self.lines if text in line), None)
            if found is not None:
                return found
            assert self.proc.poll() is None or self._reader.is_alive(), "\n".join(self.lines)
            time.sleep(0.05)
        raise AssertionError(f"no line with {text!r} within {timeout}s; stderr:\n" + "\n".join(self.lines))

    def wait(self, timeout: float) -> int:
        returncode = self.proc.wait(timeout)
        self._reader.join(5)
        return returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _http_on(sock: socket.socket, request: bytes) -> tuple[str, dict]:
    """Send one request on an open connection; (status line, {"headers": {name: value}, "json": body})."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += _receive(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    status, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    while len(body) < int(headers["content-length"]):
        body += _receive(sock)
    return status, {"headers": headers, "json": json.loads(body)}


def _receive(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)  # the socket's timeout turns a hang into an error
    assert chunk, "the server closed the connection without answering"
    return chunk


def _request(method: str, path: str, body: dict | None = None) -> bytes:
    payload = b"" if body is None else json.dumps(body).encode()
    return (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


def _last_event(stream_text: str) -> dict:
    frames = [f for f in stream_text.split("\n\n") if f.startswith("data: ")]
    assert frames[-1] == "data: [DONE]"
    return json.loads(frames[-2][len("data: "):])


def test_default_shutdown_fits_the_kubernetes_grace_period():
    worst_case = ServerConfig().shutdown_timeout + ABORT_GRACE_S + 2 * RUNNER_SHUTDOWN_S
    assert worst_case <= KUBERNETES_GRACE_S - 5  # room left for the engine stop and the process exit


async def test_sigint_ends_the_stream_answers_503_on_open_connections_and_exits_in_time(tiny_checkpoint):
    server = ServeProcess(tiny_checkpoint, "--shutdown-timeout", "2")
    try:
        banner = await asyncio.to_thread(server.wait_for_line, "clients use base_url")
        assert server.v1 in banner
        assert any("model 'tiny-llama' (also 'default'): device cpu, dtype float32, quantization none" in line
                   for line in server.lines)
        assert any("KV cache 128 blocks x 16 tokens = 2048 tokens; max_model_len 1024, so 2 sequences" in line
                   for line in server.lines)
        idle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        assert _http_on(idle, _request("GET", "/health"))[0].startswith("HTTP/1.1 200")
        async with aiohttp.ClientSession() as session:
            stream = await session.post(server.v1 + "/chat/completions", json={**LONG_STREAM, "model": "default"})
            await stream.content.readline()
            server.proc.send_signal(signal.SIGINT)
            signalled = time.monotonic()
            await asyncio.to_thread(server.wait_for_line, "shutting down: waiting up to 2 s for 1 in-flight "
                                                          "requests; press Ctrl-C again to abort them")
            status, refused = await asyncio.to_thread(
                _http_on, idle, _request("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}))
            stream_text = await stream.text()
        returncode = await asyncio.to_thread(server.wait, 15)
        exit_after = time.monotonic() - signalled
    finally:
        server.kill()
    assert status.startswith("HTTP/1.1 503") and refused["headers"]["connection"] == "close"
    assert refused["json"]["error"]["code"] == "shutting_down"
    last = _last_event(stream_text)  # finished within the 2 s drain, or aborted at its end
    if "error" in last:
        assert last["error"]["code"] == "shutting_down" and returncode == 1
        assert any("aborting 1 in-flight requests" in line for line in server.lines)
    else:
        assert last["choices"][0]["finish_reason"] == "length" and returncode == 0
    assert exit_after < 2 + ABORT_GRACE_S + PROCESS_EXIT_S and "llmserve stopped" in server.lines[-1]
    assert not any("Traceback" in line for line in server.lines)


async def test_a_second_signal_aborts_streams_with_an_error_event_and_exits_nonzero(tiny_checkpoint):
    server = ServeProcess(tiny_checkpoint)
    try:
        await asyncio.to_thread(server.wait_for_line, "clients use base_url")
        async with aiohttp.ClientSession() as session:
            stream = await session.post(server.v1 + "/chat/completions", json=LONG_STREAM)
            await stream.content.readline()
            whole = asyncio.ensure_future(session.post(server.v1 + "/completions", json={
                "prompt": "Hi", "max_tokens": 900, "ignore_eos": True}))
            deadline = time.monotonic() + 60
            while metric_values(await (await session.get(server.v1[:-3] + "/metrics")).text()).get(
                    "llmserve_requests_running") != 2:
                assert time.monotonic() < deadline, "the two requests never ran together"
                await asyncio.sleep(0.05)
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(server.wait_for_line, "waiting up to 20 s for 2 in-flight requests")
            server.proc.send_signal(signal.SIGINT)
            second_signal = time.monotonic()
            stream_text = await stream.text()
            whole_response = await whole
            whole_body = await whole_response.json()
        returncode = await asyncio.to_thread(server.wait, 15)
        exit_after = time.monotonic() - second_signal
    finally:
        server.kill()
    assert _last_event(stream_text)["error"]["code"] == "shutting_down"
    assert whole_response.status == 503 and whole_body["error"]["code"] == "shutting_down"
    assert returncode == 1 and exit_after < ABORT_GRACE_S + PROCESS_EXIT_S  # not the 20 s drain
    assert any("aborting 2 in-flight requests" in line for line in server.lines)
    assert not any("Traceback" in line for line in server.lines)


def test_a_port_in_use_is_one_clear_line(tiny_checkpoint, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = main(["serve", "--model", str(tiny_checkpoint), "--num-blocks", "16", "--port", str(port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1
    assert err[0].startswith(f"error: cannot listen on 127.0.0.1:{port}: ") and "--port" in err[0]
