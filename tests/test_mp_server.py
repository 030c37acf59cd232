"""`llmserve serve` with the engine core in its own process: the real CLI in a subprocess, real HTTP.

A dead core ends every stream with an error and stops the server non-zero; disconnects leave nothing in
flight; several API processes share one port and one core; /health stays fast while the core is busy.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import make_hf_llama
from tests.server_helpers import free_port, health_latencies, metric_values, smollm2_tokenizer_or_none

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random LLaMA over the default model's tokenizer, saved as a HuggingFace checkpoint."""
    tokenizer = smollm2_tokenizer_or_none()
    if tokenizer is None:
        pytest.skip("the default model's tokenizer is not materialised")
    path = tmp_path_factory.mktemp("tiny-served")
    make_hf_llama(0, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                  max_position_embeddings=1024).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Served:
    """`llmserve serve` running in a subprocess on a free port; its log in a file."""

    def __init__(self, process: subprocess.Popen, port: int, log: Path):
        self.process, self.port, self.log = process, port, log
        self.base = f"http://127.0.0.1:{port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> list[tuple[int, str]]:
        """(pid, command line) of the server's child processes (engine core, API processes, resource tracker)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.process.pid and fields[0] != "Z":
                    found.append((int(stat.parent.name), (stat.parent / "cmdline").read_bytes().decode()))
            except (OSError, IndexError):
                continue
        return found

    def spawned(self) -> list[int]:
        return [pid for pid, cmdline in self.children() if "spawn_main" in cmdline]


@contextmanager
def served(checkpoint: Path, *flags: str, tmp_path: Path):
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    command = [sys.executable, "-m", "llmserve.cli", "serve", "--model", str(checkpoint), "--port", str(port),
               "--num-blocks", "512", "--log-level", "INFO", *flags]
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
    server = Served(process, port, log)
    try:
        wait_healthy(server)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_healthy(server: Served) -> None:
    import urllib.request

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.process.poll() is None, f"the server exited during start-up:\n{server.log_text()}"
        try:
            with urllib.request.urlopen(server.base + "/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server was not healthy within {START_TIMEOUT_S} s:\n{server.log_text()}")


def completion_body(max_tokens: int, stream: bool = False, **extra) -> dict:
    return {"model": "default", "prompt": "Hello there", "max_tokens": max_tokens, "stream": stream,
            "temperature": 0, "ignore_eos": True, **extra}


async def read_stream(session: aiohttp.ClientSession, base: str, first_event: asyncio.Event | None = None,
                      max_tokens: int = 900) -> list[str]:
    """The data payloads of one streamed completion, until the server ends it."""
    events = []
    async with session.post(base + "/v1/completions", json=completion_body(max_tokens, stream=True)) as response:
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: "):
                events.append(line[6:].strip().decode())
                if first_event is not None:
                    first_event.set()
    return events


async def scrape(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with session.get(base + "/metrics") as response:
        return metric_values(await response.text())


async def wait_idle(session: aiohttp.ClientSession, base: str, timeout: float = 10.0) -> dict[str, float]:
    """/metrics once nothing runs, waits or holds a KV block; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        values = await scrape(session, base)
        busy = (values["llmserve_requests_running"], values["llmserve_requests_waiting"],
                values["llmserve_kv_blocks_used"])
        if busy == (0, 0, 0):
            return values
        assert time.monotonic() < deadline, f"still busy after {timeout} s: running, waiting, blocks used = {busy}"
        await asyncio.sleep(0.1)


def test_killing_the_core_mid_stream_ends_every_stream_with_an_error_and_the_server_exits_nonzero(
        checkpoint, tmp_path):
    with served(checkpoint, tmp_path=tmp_path) as server:
        (core_pid,) = server.spawned()

        async def streams_when_the_core_dies() -> tuple[list[list[str]], float]:
            async with aiohttp.ClientSession() as session:
                started = [asyncio.Event() for _ in range(3)]
                tasks = [asyncio.create_task(read_stream(session, server.base, event)) for event in started]
                await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 10)
                os.kill(core_pid, signal.SIGKILL)
                killed_at = time.monotonic()
                results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
                return results, time.monotonic() - killed_at

        results, elapsed = asyncio.run(streams_when_the_core_dies())
        assert elapsed < 5
        for events in results:
            assert events[-1] == "[DONE]"
            assert "error" in json.loads(events[-2]), f"no error event before [DONE]: {events[-3:]}"
            assert len(events) < 900, "the stream ran to its end: the core was killed too late to test anything"
        assert server.process.wait(10) != 0
    assert "the engine core process" in server.log_text()


def test_a_storm_with_disconnects_leaves_nothing_in_flight(checkpoint, tmp_path):
    async def storm(base: str) -> dict[str, float]:
        limit = asyncio.Semaphore(10)

        async def one(index: int) -> None:
            async with limit, aiohttp.ClientSession() as session:
                if index % 10 < 3:  # 30 %: go away mid-stream
                    async with session.post(base + "/v1/completions",
                                            json=completion_body(400, stream=True)) as response:
                        await response.content.readline()
                    return
                async with session.post(base + "/v1/completions", json=completion_body(12)) as response:
                    assert response.status == 200
                    assert (await response.json())["usage"]["completion_tokens"] == 12

        await asyncio.gather(*(one(i) for i in range(40)))
        async with aiohttp.ClientSession() as session:
            return await wait_idle(session, base)

    with served(checkpoint, tmp_path=tmp_path) as server:
        idle = asyncio.run(storm(server.base))
        assert idle["llmserve_generation_tokens_total"] >= 28 * 12
        server.process.send_signal(signal.SIGTERM)
        # 0: the API process had no request left to abort when it shut down
        assert server.process.wait(15) == 0


def test_two_api_processes_share_the_port_and_the_core(checkpoint, tmp_path):
    async def requests_and_scrapes(base: str) -> tuple[int, list[dict[str, float]]]:
        async def one() -> int:
            async with aiohttp.ClientSession() as session:  # a connection of its own: the kernel picks a process
                async with session.post(base + "/v1/completions", json=completion_body(5)) as response:
                    assert response.status == 200
                    return (await response.json())["usage"]["completion_tokens"]

        num_tokens = 0
        deadline = time.monotonic() + 30  # one process may still be starting when the other answered /health
        while len(served_by()) < 2 and time.monotonic() < deadline:
            num_tokens += sum(await asyncio.gather(*(one() for _ in range(16))))
            await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as session:
            await wait_idle(session, base)
        scrapes = []
        for _ in range(12):
            async with aiohttp.ClientSession() as session:
                scrapes.append(await scrape(session, base))
        return num_tokens, scrapes

    def served_by() -> set[str]:
        return set(re.findall(r"(llmserve-api-\d) llmserve\.access", server.log_text()))

    with served(checkpoint, "--api-server-count", "2", tmp_path=tmp_path) as server:
        assert len(server.spawned()) == 3  # the engine core and two API processes
        num_tokens, scrapes = asyncio.run(requests_and_scrapes(server.base))
        assert num_tokens % (16 * 5) == 0 and num_tokens > 0
        assert {s["llmserve_generation_tokens_total"] for s in scrapes} == {num_tokens}, \
            "an API process shows other numbers than the shared core's"
        assert served_by() == {"llmserve-api-0", "llmserve-api-1"}, server.log_text()[-3000:]
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(15) == 0
    assert server.log_text().count("llmserve is serving on") == 1


def test_health_answers_fast_while_the_core_is_busy(checkpoint, tmp_path):
    async def soak_and_probe(base: str, seconds: float) -> list[float]:
        stop = asyncio.Event()

        async def client() -> None:
            async with aiohttp.ClientSession() as session:
                while not stop.is_set():
                    async with session.post(base + "/v1/completions", json=completion_body(64)) as response:
                        assert response.status == 200
                        await response.read()

        async def probe() -> list[float]:
            async with aiohttp.ClientSession() as session:
                return await health_latencies(session, base, stop.is_set)

        clients = [asyncio.create_task(client()) for _ in range(16)]
        probing = asyncio.create_task(probe())
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*clients)
        return await probing

    with served(checkpoint, tmp_path=tmp_path) as server:
        latencies = sorted(asyncio.run(soak_and_probe(server.base, 8.0)))
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(f"/health during a concurrency-16 soak: {len(latencies)} probes, p50 "
          f"{latencies[len(latencies) // 2] * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, max {latencies[-1] * 1e3:.1f} ms")
    assert p99 < 0.1


def test_a_core_startup_error_reaches_the_terminal_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    result = subprocess.run([sys.executable, "-m", "llmserve.cli", "serve", "--model", str(tmp_path),
                             "--port", str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "GPT2LMHeadModel" in errors[0], result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--api-server-count", "0"], "at least 1"),
    (["--api-server-count", "2", "--engine-in-process"], "--engine-in-process"),
])
def test_bad_process_flags_get_one_line(flags, message):
    result = subprocess.run([sys.executable, "-m", "llmserve.cli", "serve", "--model", "/nonexistent", *flags],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and message in result.stderr and "Traceback" not in result.stderr


def alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still running after `timeout` seconds (empty when every one ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.1)
    return [pid for pid in pids if alive(pid)]


def test_a_dead_api_process_stops_the_whole_server_nonzero(checkpoint, tmp_path):
    with served(checkpoint, "--api-server-count", "2", tmp_path=tmp_path) as server:
        children = sorted(server.spawned())
        api = children[1:]  # the supervisor starts the core first, then the API processes
        assert len(children) == 3
        os.kill(api[0], signal.SIGKILL)
        assert server.process.wait(15) == 1
        assert wait_gone(children, 10) == [], "a process of the server outlived it"
    assert "stopping the server (exit status 1" in server.log_text()


def test_killing_the_supervisor_leaves_no_process_behind(checkpoint, tmp_path):
    with served(checkpoint, "--api-server-count", "2", tmp_path=tmp_path) as server:
        children = server.spawned()
        assert len(children) == 3
        server.process.kill()
        server.process.wait(5)
        # the core sees its spawner's pipe close and exits; the API processes then see the core gone
        assert wait_gone(children, 15) == [], "orphaned processes kept running"
