"""/health latency while the server is saturated: can a liveness probe trust it?

Starts `llmserve serve` (any serve flags after `--`), keeps `--concurrency` clients sending chat
completions until `--num-requests` have finished, and meanwhile asks GET /health every
`--probe-interval` seconds on a connection of its own. Prints and writes (--out) the probe latencies'
p50/p99/max and the completions' throughput.

    python bench/health_soak.py --concurrency 48 --num-requests 1000 --out health.json -- --model default
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Write a short poem about the sea.", "Explain what a hash table is.", "List five fruits.",
           "What is the capital of Italy?", "Give me three tips for learning to cook."]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def wait_healthy(base: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with status {server.returncode} during start-up")
            try:
                async with session.get(base + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the server was not healthy within {timeout:g} s")


async def soak(base: str, concurrency: int, num_requests: int, max_tokens: int, interval: float) -> dict:
    remaining = num_requests
    tokens = 0
    done = asyncio.Event()

    async def client(index: int) -> None:
        nonlocal remaining, tokens
        async with aiohttp.ClientSession() as session:
            while remaining > 0:
                remaining -= 1
                body = {"model": "default", "max_tokens": max_tokens, "temperature": 0.7,
                        "messages": [{"role": "user", "content": PROMPTS[(index + remaining) % len(PROMPTS)]}]}
                async with session.post(base + "/v1/chat/completions", json=body) as response:
                    assert response.status == 200, await response.text()
                    tokens += (await response.json())["usage"]["completion_tokens"]

    async def probe() -> list[float]:
        latencies = []
        async with aiohttp.ClientSession() as session:
            while not done.is_set():
                began = time.perf_counter()
                async with session.get(base + "/health") as response:
                    assert response.status == 200
                    await response.read()
                latencies.append(time.perf_counter() - began)
                await asyncio.sleep(interval)
        return latencies

    probing = asyncio.create_task(probe())
    began = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    seconds = time.perf_counter() - began
    done.set()
    latencies = sorted(await probing)

    def at(q: float) -> float:
        return 1e3 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {"num_requests": num_requests, "concurrency": concurrency, "seconds": seconds,
            "output_tok_s": tokens / seconds, "num_probes": len(latencies),
            "health_ms": {"p50": at(0.5), "p99": at(0.99), "max": 1e3 * latencies[-1]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--probe-interval", type=float, default=0.05)
    parser.add_argument("--out", default=None)
    parser.add_argument("serve_args", nargs="*", help="flags for `llmserve serve` (after --)")
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, "-m", "llmserve.cli", "serve", "--port", str(port), "--no-access-log",
               "--max-waiting", "100000", *args.serve_args]
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_healthy(base, server))
        result = asyncio.run(soak(base, args.concurrency, args.num_requests, args.max_tokens, args.probe_interval))
    finally:
        server.terminate()
        server.wait(60)
    result.update(date=datetime.date.today().isoformat(), machine=platform.processor() or platform.machine(),
                  command=" ".join(sys.argv), serve=" ".join(command[1:]))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
