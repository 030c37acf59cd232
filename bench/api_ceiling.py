"""How many tokens a second can one API process stream? The server over a scripted engine core.

The real aiohttp app, AsyncLLM and OutputProcessor (with the default model's tokenizer), over a core that
does no model work: each "step" gives every running request one token after `--step-ms` milliseconds. So
the output throughput `llmserve bench serve` measures against it is the API process's ceiling: HTTP,
detokenization, SSE encoding and socket writes, nothing else. Steps come on time whatever the API process
does (as from a core in its own process); `--step-ms 0` gives one step per read of the core. On a GPU, a model whose engine makes tokens
faster than this needs `--api-server-count` > 1.

    python bench/api_ceiling.py --concurrency 256 [--profile FILE]   # then reads the bench's summary

The bench client runs in its own process (it needs a core of its own to be out of the way).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmserve.core.messages import (EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest,  # noqa: E402
                                    ModelInfo, SchedulerStats)
from llmserve.frontend.engine_client import EngineDeadError  # noqa: E402

TOKENS = list(range(1000, 1400))  # ordinary word pieces of the SmolLM2 vocabulary, cycled


class ScriptedCore:
    """A CoreClient whose steps cost `step_s` and give each running request its next token."""

    def __init__(self, step_s: float, tokenizer_path: str):
        self.step_s = step_s
        self.info = ModelInfo(vocab_size=49152, max_model_len=8192, eos_token_ids=[0], device="none",
                              dtype="none", quantization=None, kv_cache_dtype="none", num_kv_blocks=0,
                              block_size=16, max_num_seqs=1024, tokenizer_path=tokenizer_path)
        self.running: dict[str, list[int]] = {}  # request id -> [tokens made, max tokens]
        self.num_received = 0
        self.generated = 0
        self.alive = False
        self.next_step_at = 0.0  # perf_counter time of the next step

    async def start(self) -> None:
        self.alive = True

    async def shutdown(self) -> None:
        self.alive = False

    @property
    def is_alive(self) -> bool:
        return self.alive

    def add_request(self, request: EngineCoreRequest) -> None:
        self.running[request.request_id] = [0, request.params.max_tokens or 16]
        self.num_received += 1

    def abort_requests(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.running.pop(request_id, None)

    async def get_output(self) -> EngineCoreOutputs:
        """The next step, `step_s` after the previous one (the core runs on whatever the API process does)."""
        if not self.alive:
            raise EngineDeadError("stopped")
        while not self.running and self.alive:
            await asyncio.sleep(0.001)
            self.next_step_at = time.perf_counter()
        await asyncio.sleep(max(self.next_step_at - time.perf_counter(), 0))
        return self._step()

    def get_output_nowait(self) -> EngineCoreOutputs | None:
        """A step whose time has come while the API process was busy (a real core would have sent it)."""
        if not self.running or (self.step_s and time.perf_counter() < self.next_step_at):
            return None
        return self._step()

    def _step(self) -> EngineCoreOutputs:
        self.next_step_at += self.step_s
        outputs = []
        for request_id, state in list(self.running.items()):
            token = TOKENS[state[0] % len(TOKENS)]
            state[0] += 1
            finished = state[0] >= state[1]
            outputs.append(EngineCoreOutput(request_id, [token], finish_reason="length" if finished else None))
            if finished:
                del self.running[request_id]
        self.generated += len(outputs)
        stats = SchedulerStats(num_running=len(self.running), num_generation_tokens_total=self.generated)
        return EngineCoreOutputs(outputs, stats, time.time(), self.num_received)


async def serve(port: int, step_s: float, bench: list[str], profile: str | None) -> None:
    from aiohttp import web

    from llmserve.checkpoint.pull import resolve_model
    from llmserve.frontend.async_llm import AsyncLLM
    from llmserve.frontend.tokenizer import load_tokenizer
    from llmserve.server.app import create_app, runner_kwargs
    from llmserve.server.config import ServerConfig
    from llmserve.server.state import CONFIG

    path = resolve_model("default")
    client = AsyncLLM(ScriptedCore(step_s, str(path)), load_tokenizer(path))
    app = create_app(ServerConfig(port=port, max_waiting=100_000), client)
    runner = web.AppRunner(app, **runner_kwargs(app[CONFIG]))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    done = await asyncio.create_subprocess_exec(*bench, cwd=REPO)
    await done.wait()
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--step-ms", type=float, default=0.0, help="time each scripted step takes")
    parser.add_argument("--endpoint", default="completions", choices=["completions", "chat"])
    parser.add_argument("--profile", default=None, help="cProfile the API process into this file")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bench = [sys.executable, "-m", "llmserve.cli", "bench", "serve", "--base-url", f"http://127.0.0.1:{port}",
             "--model", "default", "--endpoint", args.endpoint, "--dataset", "random", "--input-len-min", "16",
             "--input-len-max", "64", "--output-len", str(args.output_len), "--ignore-eos", "--no-progress",
             "--num-prompts", str(args.num_prompts), "--concurrency", str(args.concurrency),
             "--metrics-interval-ms", "0"] + (["--out", args.out] if args.out else [])
    asyncio.run(serve(port, args.step_ms / 1e3, bench, args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
