"""Real servers on loopback ports for the server tests, and tiny engines to put behind them.

Each server runs its own event loop in a background thread, so that tests can use the
sync `openai` client, the async one and raw aiohttp alike.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from aiohttp import web

from llmserve.engine.engine_core import EngineCore
from llmserve.frontend.async_llm import AsyncLLM
from llmserve.frontend.inproc_core_client import InprocCoreClient
from llmserve.frontend.mp_core_client import MPCoreClient
from llmserve.server.app import create_app, runner_kwargs
from llmserve.server.config import ServerConfig
from llmserve.server.lifecycle import graceful_shutdown
from llmserve.server.state import ABORT_NOW
from tests.conftest import make_engine, make_hf_llama

SMOLLM2_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m-instruct"
SCRIPT_TEXT = "Hi 日本😀 café!"  # what the scripted model says: multi-byte characters split across tokens


def smollm2_tokenizer_or_none():
    """The default model's tokenizer once its checkpoint is complete, else None."""
    if not (SMOLLM2_DIR / ".complete").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM2_DIR)


# Where test servers run their engine core: "process" (as `llmserve serve` does: the model is sent to an
# engine-core process of its own) or "inproc" (in the test's process: white-box tests, debugging).
CORE_MODE = os.environ.get("LLMSERVE_TEST_CORE", "process")
# Tensor-parallel ranks of the test servers' engine core (process mode): 2 runs the server suite on a tp=2
# engine, its model saved to a folder that each rank loads its shard from (the tiny test models have 4
# heads; the default model's 9 take 3).
TEST_TP = int(os.environ.get("LLMSERVE_TEST_TP", "1"))


def engine_client(engine, core_mode: str = CORE_MODE) -> AsyncLLM:
    """The engine client a server uses for a synchronous test Engine: AsyncLLM over an engine core holding the
    same model and configuration, in a process of its own or (core_mode "inproc") the Engine's own core."""
    if core_mode == "inproc":
        return AsyncLLM(InprocCoreClient(engine.core), engine.tokenizer)
    assert core_mode == "process", f"unknown LLMSERVE_TEST_CORE {core_mode!r}"
    core = engine.core
    if TEST_TP > 1:
        build = functools.partial(_parallel_core, _saved(engine), core.config, core.kv.num_blocks, TEST_TP)
    else:
        build = functools.partial(EngineCore, core.runner.model, core.model_config, core.config, core.kv.num_blocks,
                                  core.info.tokenizer_path)
    return AsyncLLM(MPCoreClient(build=build), engine.tokenizer)


def _saved(engine) -> str:
    """A folder holding the engine's model: the test's HF model saved, or the checkpoint it was loaded from."""
    import tempfile

    if getattr(engine, "hf_source", None) is None:
        return engine.core.info.tokenizer_path
    path = tempfile.mkdtemp(prefix="llmserve-test-tp-")
    engine.hf_source.save_pretrained(path)
    if engine.tokenizer is not None:
        engine.tokenizer.save_pretrained(path)
    return path


def _parallel_core(path: str, config, num_blocks: int, tp: int) -> EngineCore:
    from dataclasses import replace

    from llmserve.config import ParallelConfig

    config = replace(config, model=path, cache=replace(config.cache, num_blocks=num_blocks),
                     parallel=ParallelConfig(tensor_parallel_size=tp))
    return EngineCore.from_config(config, progress=lambda message: None)


def make_tiny_engine(tokenizer, *, seed: int = 0, num_blocks: int = 256, block_size: int = 16, **overrides):
    """A random tiny LLaMA over the real tokenizer's vocabulary (garbage text, real everything else)."""
    hf = make_hf_llama(seed, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       max_position_embeddings=1024)
    return make_engine(hf, num_blocks=num_blocks, block_size=block_size, tokenizer=tokenizer, **overrides)


def make_scripted_engine(tokenizer, text: str = SCRIPT_TEXT, **overrides):
    """A tiny LLaMA whose greedy output is `text` then EOS, whatever the prompt.

    Every layer writes nothing to the residual stream, so the logits depend on the last
    token only: each token of `text` points at the next one, EOS follows the last, and
    any other token (carrying a shared direction `u`) points at the first.
    """
    script = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert len(set(script)) == len(script), "the script must not repeat a token"
    hf = make_hf_llama(0, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       max_position_embeddings=1024)
    _write_script(hf, script)
    return make_engine(hf, num_blocks=256, block_size=16, tokenizer=tokenizer, **overrides)


@torch.no_grad()
def _write_script(hf, script: list[int]) -> None:
    hidden = hf.config.hidden_size
    assert len(script) < hidden, "one orthogonal direction per script token, plus u"
    basis = torch.linalg.qr(torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(0)))[0].T
    u, directions = basis[0], basis[1:len(script) + 1]
    for layer in hf.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    embed, head = hf.model.embed_tokens.weight, hf.lm_head.weight
    embed.copy_(u + 0.01 * torch.randn_like(embed))
    head.mul_(0.01)
    for token, direction in zip(script, directions):
        embed[token] = direction
    head[script[0]] = 10 * u
    for token, next_token in zip(script, script[1:]):
        head[next_token] = 10 * directions[script.index(token)]


@dataclass
class ServerThread:
    """A real llmserve app on 127.0.0.1:<free port>, served from its own thread and loop."""

    engine: object  # the synchronous Engine, or None when every model is built in the background
    config: ServerConfig = field(default_factory=lambda: ServerConfig(port=0))
    building: dict = field(default_factory=dict)  # served name -> EngineBuild (create_app's `building`)
    extra_models: dict = field(default_factory=dict)  # served name -> synchronous Engine, served beside `engine`
    core_mode: str = CORE_MODE  # "inproc": white-box tests that read `engine`'s pool after the server stopped
    base_url: str = ""
    loop: asyncio.AbstractEventLoop | None = None
    app: web.Application | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None
    _stopping: object = None  # concurrent.futures.Future of the runner cleanup

    def start(self) -> "ServerThread":
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        assert ready.wait(30), "the server did not start"
        return self

    def _serve(self, ready: threading.Event) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._start_site())
        ready.set()
        self.loop.run_forever()
        self.loop.close()

    async def _start_site(self) -> None:
        engine = None if self.engine is None else engine_client(self.engine, self.core_mode)
        extra = {name: engine_client(e, self.core_mode) for name, e in self.extra_models.items()}
        self.app = create_app(self.config, engine, extra_models=extra, building=self.building)
        self._runner = web.AppRunner(self.app, **runner_kwargs(self.config))
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"

    def begin_stop(self) -> None:
        """Start a graceful shutdown, as on a first SIGINT/SIGTERM, without waiting."""
        if self._stopping is None:
            self._stopping = asyncio.run_coroutine_threadsafe(graceful_shutdown(self._runner), self.loop)

    def abort_inflight(self) -> None:
        """What a second SIGINT/SIGTERM does: stop waiting for in-flight requests and abort them."""
        self.loop.call_soon_threadsafe(self.app[ABORT_NOW].set)

    def stop(self) -> None:
        """Shut down gracefully (or finish doing so) and end the thread."""
        self.begin_stop()
        self._stopping.result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"


def start_server(engine, core_mode: str = CORE_MODE, **config_fields) -> ServerThread:
    return ServerThread(engine, ServerConfig(port=0, **config_fields), core_mode=core_mode).start()


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text -> {name{labels}: value} for the samples in it."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.02):
    """Poll until `predicate()` is truthy; returns its value or fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            assert value, f"condition not met within {timeout}s"
            return value
        time.sleep(interval)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server started in a subprocess."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def health_latencies(session, base_url: str, done) -> list[float]:
    """GET /health every 20 ms until `done()` is true; each answer's latency in seconds (each must be 200)."""
    latencies = []
    while not done():
        began = time.perf_counter()
        async with session.get(base_url + "/health") as response:
            assert response.status == 200
        latencies.append(time.perf_counter() - began)
        await asyncio.sleep(0.02)
    return latencies
