"""Tensor and pipeline parallel execution on CPU (gloo): every split gives tp=1's tokens and logprobs; rank
shards load per rank; a bad shard or a dead worker fails with a message that names what happened."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from llmserve.checkpoint.convert import convert_checkpoint
from llmserve.llm import LLM
from llmserve.sampling_params import SamplingParams
from tests.conftest import make_hf_llama
from tests.test_mp_server import checkpoint, completion_body, read_stream, served, wait_idle  # noqa: F401 (fixture)

# GQA with one KV head (fewer than tp: duplicated per rank), a vocabulary tp does not divide, odd layers
SHAPE = dict(vocab_size=251, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=1, max_position_embeddings=512)
PROMPTS = [[5, 6, 7, 8, 9, 10], [40, 41, 42], list(range(60, 97)), [200, 3, 250, 17]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-parallel")
    model = make_hf_llama(3, **SHAPE)
    for param in model.parameters():  # larger weights: varied greedy tokens, not one repeated id
        param.data.mul_(4.0)
    model.save_pretrained(path)
    return path


def outputs(model: str, tp: int = 1, pp: int = 1) -> list[tuple[list[int], list[list[tuple[int, float]]]]]:
    """Token ids and top-3 logprobs of PROMPTS (greedy, then one seeded sampled copy of each)."""
    with LLM(model, tensor_parallel_size=tp, pipeline_parallel_size=pp, num_blocks=96, block_size=4) as llm:
        results = llm.generate(PROMPTS * 2, [GREEDY] * len(PROMPTS) + [SEEDED] * len(PROMPTS))
        assert llm.engine.kv.num_used_blocks == 0
    return [(out.token_ids, [[(token.token_id, token.logprob), *token.top_logprobs] for token in out.logprobs])
            for result in results for out in result.outputs]


@pytest.fixture(scope="module")
def reference(hf_dir):
    return outputs(str(hf_dir))


def assert_same(got, want) -> None:
    for (ids, tops), (want_ids, want_tops) in zip(got, want, strict=True):
        assert ids == want_ids
        for top, want_top in zip(tops, want_tops, strict=True):
            assert [t for t, _ in top] == [t for t, _ in want_top]
            assert [lp for _, lp in top] == pytest.approx([lp for _, lp in want_top], abs=1e-4)


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2), (4, 1), (1, 3), (4, 2)])
def test_every_split_gives_the_tokens_and_logprobs_of_one_rank(hf_dir, reference, tp, pp):
    assert len({tuple(ids) for ids, _ in reference}) > 2, "the model must not answer everything alike"
    assert_same(outputs(str(hf_dir), tp, pp), reference)


def test_two_pipeline_stages_keep_two_steps_in_flight(hf_dir):
    with LLM(str(hf_dir), pipeline_parallel_size=2, num_blocks=96, block_size=4) as llm:
        core, in_flight_at_launch = llm.engine.core, []
        launch = core.runner.launch_step

        def counting_launch(out, *args):
            in_flight_at_launch.append(len(core._pipeline))
            launch(out, *args)
        core.runner.launch_step = counting_launch
        llm.generate(PROMPTS, GREEDY)
    assert max(in_flight_at_launch) == 1  # a step launched while the other stage still ran one


def test_each_rank_loads_its_own_converted_shard(hf_dir, reference, tmp_path):
    converted = convert_checkpoint(hf_dir, tmp_path / "tp2pp2", tp_size=2, pp_size=2, progress=False)
    assert_same(outputs(str(converted), 2, 2), reference)
    with pytest.raises(ValueError, match=r"converted for tp=2 pp=2, not tp=2 pp=1"):
        LLM(str(converted), tensor_parallel_size=2, num_blocks=32, block_size=4)


def test_a_bad_shard_fails_startup_naming_its_rank(hf_dir, tmp_path):
    converted = convert_checkpoint(hf_dir, tmp_path / "tp2", tp_size=2, progress=False)
    shard = converted / "rank1.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])  # truncated, as a failed copy leaves it
    began = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 failed to start"):
        LLM(str(converted), tensor_parallel_size=2, num_blocks=32, block_size=4)
    assert time.monotonic() - began < 60


def test_a_dead_worker_fails_the_next_step_promptly(hf_dir):
    llm = LLM(str(hf_dir), tensor_parallel_size=2, num_blocks=64, block_size=4)
    (worker,) = llm.engine.core.ranks.workers
    worker.kill()
    worker.join(5)
    began = time.monotonic()
    with pytest.raises(RuntimeError, match=r"parallel step failed \(rank 1 exited \(signal 9\)\)"):
        llm.generate([[1, 2, 3]], GREEDY)
    assert time.monotonic() - began < 10
    llm.shutdown()


def test_a_hung_worker_fails_the_step_after_the_timeout(hf_dir):
    from llmserve.config import CacheConfig, EngineConfig, ParallelConfig
    from llmserve.engine.engine import Engine

    config = EngineConfig(model=str(hf_dir), cache=CacheConfig(block_size=4, num_blocks=64),
                          parallel=ParallelConfig(tensor_parallel_size=2, step_timeout_s=3))
    llm = LLM(engine=Engine.from_config(config, progress=lambda message: None))
    (worker,) = llm.engine.core.ranks.workers
    os.kill(worker.pid, signal.SIGSTOP)  # alive, holding its connections, doing nothing: a hang
    try:
        began = time.monotonic()
        with pytest.raises(RuntimeError, match=r"parallel step failed \(no worker has exited"):
            llm.generate([[1, 2, 3]], GREEDY)
        assert time.monotonic() - began < 15
    finally:
        worker.kill()
        llm.shutdown()


def _grandchildren(pid: int) -> list[int]:
    """Spawned processes whose parent is a child of `pid` (the workers under `llmserve serve`'s engine core)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError):
            continue
    children = {p for p, parent in parents.items() if parent == pid}
    return [p for p, parent in parents.items()
            if parent in children and b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_the_server_at_tp2_answers_as_one_rank_and_stops_when_a_worker_dies(checkpoint, tmp_path):
    path = checkpoint  # a tiny random LLaMA with the default model's tokenizer
    with LLM(str(path), num_blocks=256, block_size=16) as llm:
        want = llm.generate("Hello there", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    want_text = want[0].outputs[0].text

    async def check(base: str) -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(base + "/v1/completions", json=completion_body(12)) as response:
                assert response.status == 200
                assert (await response.json())["choices"][0]["text"] == want_text
            events = await read_stream(session, base, max_tokens=12)
            assert events[-1] == "[DONE]"
            assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]
                           if json.loads(e)["choices"]) == want_text
            await wait_idle(session, base)

    async def streams_when_a_worker_dies(base: str, worker: int) -> tuple[list[list[str]], float]:
        async with aiohttp.ClientSession() as session:
            started = [asyncio.Event() for _ in range(3)]
            tasks = [asyncio.create_task(read_stream(session, base, event)) for event in started]
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 20)
            os.kill(worker, signal.SIGKILL)
            killed_at = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
            return results, time.monotonic() - killed_at

    with served(path, "--tp", "2", "--dist-timeout", "20", tmp_path=tmp_path) as server:
        asyncio.run(check(server.base))
        (worker,) = _grandchildren(server.process.pid)
        results, elapsed = asyncio.run(streams_when_a_worker_dies(server.base, worker))
        assert elapsed < 10
        for events in results:
            assert events[-1] == "[DONE]"
            assert "error" in json.loads(events[-2]), f"no error event before [DONE]: {events[-3:]}"
        assert server.process.wait(10) != 0


def _generate(*flags: str) -> str:
    import subprocess
    import sys

    command = [sys.executable, "-m", "llmserve.cli", "generate", "--model", "default", "--chat", "--max-tokens", "48",
               "--prompt", "Write a haiku about the sea, then explain it in two sentences.", *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_the_default_model_gives_the_same_text_at_tp3_pp2_and_both():
    """SmolLM2: 9 heads and 3 KV heads over 3 tensor ranks (one KV head each), 30 layers over 2 stages."""
    want = _generate()
    assert len(want.split()) > 10
    for flags in (["--tp", "3"], ["--pp", "2"], ["--tp", "3", "--pp", "2"]):
        assert _generate(*flags) == want, flags


def test_ranks_on_a_second_host_join_through_torchrun(checkpoint):
    """Two "hosts" on localhost: rank 0 and rank 1 under `llmserve generate --local-ranks 2`, ranks 2 and 3 under
    `torchrun ... -m llmserve.cli worker --first-rank 2`, meeting at one --dist-init-method (tp=2 x pp=2)."""
    import subprocess
    import sys

    from tests.server_helpers import free_port

    path = checkpoint
    cli = [sys.executable, "-m", "llmserve.cli"]
    generate = ["generate", "--model", str(path), "--num-blocks", "64", "--prompt", "Hello there", "--max-tokens", "16"]
    want = subprocess.run([*cli, *generate], capture_output=True, text=True, timeout=120)
    assert want.returncode == 0, want.stderr[-2000:]
    assert want.stdout.strip()

    split = ["--tp", "2", "--pp", "2", "--dist-init-method", f"tcp://127.0.0.1:{free_port()}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "llmserve.cli", "worker", "--model", str(path), "--num-blocks", "64", *split, "--first-rank", "2"]
    second_host = subprocess.Popen(torchrun, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first_host = subprocess.run([*cli, *generate, *split, "--local-ranks", "2"], capture_output=True, text=True,
                                    timeout=180)
        assert first_host.returncode == 0, first_host.stderr[-2000:]
        assert first_host.stdout == want.stdout
        assert second_host.wait(60) == 0, second_host.stdout.read()[-2000:]
    finally:
        if second_host.poll() is None:
            second_host.kill()


def test_a_random_weights_folder_gives_every_split_the_same_model(tmp_path):
    """The benchmarks' weightless checkpoint: each rank draws whole tensors by name and keeps its slice."""
    from llmserve.checkpoint.random_weights import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "random", make_hf_llama(0, **SHAPE).config.to_dict(), seed=3)
    assert_same(outputs(str(path), 2, 2), outputs(str(path)))


def test_all_reduce_time_is_counted_per_call_on_rank_0(hf_dir):
    """What bench/gpu.py reports as all-reduce time per step: one all-reduce after attention and one after
    the MLP per layer, plus the vocabulary-parallel embedding's."""
    from llmserve.distributed import CollectiveTimer

    with LLM(str(hf_dir), tensor_parallel_size=2, num_blocks=64, block_size=4) as llm:
        timer = llm.engine.core.ranks.parallel.all_reduce_timer = CollectiveTimer()
        llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert timer.count == 4 * (2 * SHAPE["num_hidden_layers"] + 1)  # 4 steps: the prefill, then 3 decodes
    assert timer.total_ms() > 0


def test_grammar_masks_reach_the_sampling_rank(checkpoint):
    """Constrained requests at tp=2 x pp=2 (masks sent with the step to the sampling rank, two steps in
    flight over disjoint requests) take exactly one rank's tokens, and they follow their grammars."""
    import re

    from llmserve.sampling_params import StructuredOutputs

    schema = {"type": "object", "additionalProperties": False, "required": ["n", "tag"],
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "tag": {"enum": ["a", "b"]}}}
    params = [SamplingParams(temperature=0.0, max_tokens=24, structured_outputs=StructuredOutputs("json", json.dumps(schema))),
              SamplingParams(temperature=0.0, max_tokens=12, structured_outputs=StructuredOutputs("regex", "[a-z]{3,9}")),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),  # unconstrained, same batch
              SamplingParams(temperature=1.0, seed=5, max_tokens=12,
                             structured_outputs=StructuredOutputs("choice", json.dumps(["north", "south"])))]
    prompts = ["Hello there", "Some words:", "Once upon", "Go"]

    def run(**split) -> list[tuple[list[int], str]]:
        with LLM(str(checkpoint), num_blocks=256, block_size=16, **split) as llm:
            return [(r.outputs[0].token_ids, r.outputs[0].text) for r in llm.generate(prompts, params)]

    want = run()
    assert run(tensor_parallel_size=2, pipeline_parallel_size=2) == want
    (_, as_json), (_, word), _, (_, direction) = want
    assert set(json.loads(as_json)) == {"n", "tag"} and re.fullmatch("[a-z]{3,9}", word)
    assert direction in ("north", "south")
