"""The engine core in its own process: same tokens as in-process, one message per step, aborts free blocks,
death detected in both directions, start-up errors with their message. Real processes, tiny random model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmserve.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig
from llmserve.core.messages import EngineCoreRequest
from llmserve.engine.core_process import CoreProcess, CoreStartupError
from llmserve.frontend.engine_client import EngineDeadError
from llmserve.frontend.mp_core_client import MPCoreClient
from llmserve.sampling_params import SamplingParams
from tests.conftest import make_hf_llama

PROMPTS = {"short": [1, 5, 9], "medium": [3, 14, 15, 92, 65, 35, 89, 79], "long": list(range(10, 40))}
REPO = Path(__file__).resolve().parents[1]


def greedy(max_tokens: int, **overrides) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **overrides)


def tiny_engine_config(model: str) -> EngineConfig:
    return EngineConfig(model=model, cache=CacheConfig(block_size=4, num_blocks=256),
                        scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=32),
                        device=DeviceConfig("cpu", "float32"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_hf_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shared_core(tiny_checkpoint):
    """One engine-core process for the tests that only need to talk to it (each joins with its own client)."""
    core = CoreProcess.launch(tiny_engine_config(str(tiny_checkpoint)))
    core.wait_ready()
    yield core
    core.stop()


async def joined_client(core: CoreProcess) -> MPCoreClient:
    client = MPCoreClient(address=core.address)
    await client.start()
    return client


async def run_to_completion(client: MPCoreClient, requests: dict[str, tuple[list[int], SamplingParams]]):
    """Send every request; (token ids per request, every message received) once all have finished."""
    for request_id, (prompt, params) in requests.items():
        client.add_request(EngineCoreRequest(request_id, prompt, params))
    tokens = {request_id: [] for request_id in requests}
    unfinished, messages = set(requests), []
    while unfinished:
        message = await asyncio.wait_for(client.get_output(), 10)
        messages.append(message)
        for output in message.outputs:
            tokens[output.request_id] += output.new_token_ids
            if output.finished:
                unfinished.discard(output.request_id)
    return tokens, messages


async def read_until(client: MPCoreClient, predicate, timeout: float = 5.0):
    """Messages until one satisfies `predicate`; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        message = await asyncio.wait_for(client.get_output(), max(deadline - time.monotonic(), 0.01))
        if predicate(message):
            return message


def in_process_tokens(config: EngineConfig, requests) -> dict[str, list[int]]:
    from llmserve.engine.engine_core import EngineCore

    core = EngineCore.from_config(config, progress=lambda _: None)
    for request_id, (prompt, params) in requests.items():
        core.add_request(EngineCoreRequest(request_id, prompt, params))
    tokens = {request_id: [] for request_id in requests}
    while core.has_unfinished_requests():
        for output in core.step().outputs:
            tokens[output.request_id] += output.new_token_ids
    return tokens


def process_gone(pid: int) -> bool:
    """No such process, or a zombie nobody has reaped yet (it runs nothing any more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_greedy_tokens_through_the_process_equal_the_in_process_core(shared_core, tiny_checkpoint):
    requests = {name: (prompt, greedy(12, ignore_eos=True)) for name, prompt in PROMPTS.items()}
    client = await joined_client(shared_core)
    try:
        tokens, _ = await run_to_completion(client, requests)
    finally:
        await client.shutdown()
    assert tokens == in_process_tokens(tiny_engine_config(str(tiny_checkpoint)), requests)
    assert all(len(ids) == 12 for ids in tokens.values())


async def test_outputs_of_one_step_arrive_as_one_message(shared_core):
    requests = {f"together-{i}": ([7, 8, 9 + i], greedy(24, ignore_eos=True)) for i in range(3)}
    client = await joined_client(shared_core)
    try:
        _, messages = await run_to_completion(client, requests)
    finally:
        await client.shutdown()
    steps = [m.stats.num_steps for m in messages if m.outputs]
    assert len(steps) == len(set(steps)), "two messages carried outputs of the same step"
    assert any({o.request_id for o in m.outputs} == set(requests) for m in messages), \
        "the three requests decoded together but never arrived in one message"
    assert all(len(m.outputs) == len({o.request_id for o in m.outputs}) for m in messages)


async def test_aborts_free_every_block(shared_core):
    requests = {f"aborted-{i}": (PROMPTS["medium"], greedy(100, ignore_eos=True)) for i in range(4)}
    client = await joined_client(shared_core)
    try:
        for request_id, (prompt, params) in requests.items():
            client.add_request(EngineCoreRequest(request_id, prompt, params))
        started: set[str] = set()
        await read_until(client, lambda m: started.update(o.request_id for o in m.outputs) or started == set(requests))
        client.abort_requests(list(requests))
        idle = await read_until(client, lambda m: m.stats.num_running == m.stats.num_waiting == 0)
    finally:
        await client.shutdown()
    assert idle.stats.kv_blocks_used == 0
    assert idle.num_requests_received == len(requests)


async def test_each_client_gets_its_own_outputs_and_the_shared_stats(shared_core):
    watcher, sender = await joined_client(shared_core), await joined_client(shared_core)
    try:
        # a Hello makes the (idle) core send its stats: the watcher hears without sending anything
        before = (await read_until(watcher, lambda m: True)).stats.num_generation_tokens_total
        tokens, _ = await run_to_completion(sender, {"mine": (PROMPTS["short"], greedy(6, ignore_eos=True))})
        seen = await read_until(watcher, lambda m: m.stats.num_generation_tokens_total >= before + 6
                                and m.stats.num_running == 0)
    finally:
        await watcher.shutdown()
        await sender.shutdown()
    assert len(tokens["mine"]) == 6
    assert seen.outputs == [] and seen.num_requests_received == 0
    assert seen.stats.kv_blocks_used == 0


async def test_killing_the_core_mid_request_fails_get_output_within_5s(tiny_checkpoint):
    client = MPCoreClient(tiny_engine_config(str(tiny_checkpoint)))
    await client.start()
    try:
        client.add_request(EngineCoreRequest("doomed", PROMPTS["short"], greedy(400, ignore_eos=True)))
        await read_until(client, lambda m: bool(m.outputs))
        os.kill(client.core_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(EngineDeadError, match="SIGKILL"):
            while True:
                await asyncio.wait_for(client.get_output(), 5)
        assert time.monotonic() - killed_at < 5
        assert not client.is_alive
        with pytest.raises(EngineDeadError):
            client.add_request(EngineCoreRequest("late", PROMPTS["short"], greedy(4)))
    finally:
        await client.shutdown()


CLIENT_SCRIPT = """
import asyncio, sys, time
from llmserve.config import EngineConfig
from llmserve.frontend.mp_core_client import MPCoreClient
import msgspec

async def main():
    client = MPCoreClient(msgspec.json.decode(sys.argv[1], type=EngineConfig))
    await client.start()
    print(client.core_pid, flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def test_the_core_exits_when_its_client_process_is_killed(tiny_checkpoint):
    import msgspec

    config = msgspec.json.encode(tiny_engine_config(str(tiny_checkpoint))).decode()
    client = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, config], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        core_pid = int(client.stdout.readline())
        assert not process_gone(core_pid)
        client.kill()
        client.wait(10)
        deadline = time.monotonic() + 5
        while not process_gone(core_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_gone(core_pid), "the engine core outlived the API process that started it"
    finally:
        client.kill()


def unsupported_checkpoint(path: Path) -> Path:
    (path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    return path


@pytest.mark.parametrize("model, message", [
    (lambda tmp: tmp / "no-such-checkpoint", "does not exist"),
    (unsupported_checkpoint, "GPT2LMHeadModel"),
])
async def test_a_startup_error_reaches_the_client_with_its_message(tmp_path, model, message):
    client = MPCoreClient(tiny_engine_config(str(model(tmp_path))))
    with pytest.raises(CoreStartupError, match=message) as raised:
        await client.start()
    assert "\n" not in str(raised.value)
    assert client.process.process.exitcode == 1
    assert not client.is_alive


async def test_joining_an_address_where_no_core_runs_fails_quickly(tmp_path):
    client = MPCoreClient(address=f"ipc://{tmp_path}/nobody.sock", connect_timeout=0.3)
    with pytest.raises(EngineDeadError, match="no engine core answered"):
        await client.start()
    assert not client.is_alive


async def test_outputs_that_already_arrived_are_taken_without_waiting_and_in_order(shared_core, tiny_checkpoint):
    client = await joined_client(shared_core)
    try:
        await asyncio.sleep(0.2)
        while client.get_output_nowait() is not None:  # stats the core sent after the handshake
            pass
        assert client.get_output_nowait() is None  # nothing sent, nothing there: no wait, no error
        client.add_request(EngineCoreRequest("drained", PROMPTS["medium"], greedy(16, ignore_eos=True)))
        await asyncio.sleep(1.0)  # the core finishes the request meanwhile: its messages wait in the socket
        tokens, finished = [], False
        first = await asyncio.wait_for(client.get_output(), 5)
        for message in [first, *iter(client.get_output_nowait, None)]:
            for output in message.outputs:
                tokens += output.new_token_ids
                finished = finished or output.finished
        assert finished and len(tokens) == 16
        expected = in_process_tokens(tiny_engine_config(str(tiny_checkpoint)),
                                     {"drained": (PROMPTS["medium"], greedy(16, ignore_eos=True))})
        assert tokens == expected["drained"]
    finally:
        await client.shutdown()
