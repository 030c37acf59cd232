"""The step contract is plain data: the real scheduler and runner (tiny model) run on msgpack copies of
each other's messages, and the runner's per-request state follows the scheduler's exactly."""

from __future__ import annotations

import copy
import dataclasses

import msgspec

from llmserve.core.messages import EngineCoreRequest
from llmserve.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from llmserve.sampling_params import SamplingParams
from tests.conftest import make_engine
from tests.test_model_parity import hf_greedy, random_prompts

PLAIN = (int, float, str, bool, type(None))


def assert_plain(value, path: str) -> None:
    """Only ints, floats, strings, lists, dicts, sets, msgspec structs and SamplingParams, all the way down."""
    if isinstance(value, PLAIN):
        return
    if isinstance(value, (list, tuple, set)):
        for i, item in enumerate(value):
            assert_plain(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{path} has a key of type {type(key).__name__}"
            assert_plain(item, f"{path}[{key!r}]")
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            assert_plain(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, SamplingParams):
        for field in dataclasses.fields(value):
            assert_plain(getattr(value, field.name), f"{path}.{field.name}")
    else:
        raise AssertionError(f"{path} is a {type(value).__name__}, not plain data")


def over_the_wire(message, kind):
    """A msgpack copy, as another process would receive it; checks that nothing was lost."""
    assert_plain(message, kind.__name__)
    copied = msgspec.msgpack.decode(msgspec.msgpack.encode(message), type=kind)
    assert copied == message == copy.deepcopy(message)
    return copied


def test_scheduler_and_runner_work_from_msgpack_copies_of_each_other(tiny_hf_llama):
    engine = make_engine(tiny_hf_llama, num_blocks=16, block_size=4, async_scheduling=False)  # preempts
    scheduler, runner = engine.scheduler, engine.runner
    prompts = random_prompts(8, 256, seed=21)
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=2 if i % 2 else None)
        engine.core.add_request(EngineCoreRequest(f"r{i}", prompt, params))
    seqs = dict(scheduler.requests)
    resumed, with_logprobs = 0, 0
    while scheduler.has_unfinished():
        out = scheduler.schedule()
        resumed += sum(1 for new in out.new_requests if new.output_token_ids)
        result = over_the_wire(runner.execute(over_the_wire(out, SchedulerOutput)), ModelRunnerOutput)
        with_logprobs += sum(lp is not None for lp in result.logprobs or [])
        scheduler.update(out, result)
    assert scheduler.num_preemptions > 0 and resumed > 0 and with_logprobs > 0
    for i, prompt in enumerate(prompts):
        assert seqs[f"r{i}"].output_token_ids == hf_greedy(tiny_hf_llama, prompt, 10), f"request {i} diverged"


def test_runner_state_mirrors_the_scheduler_and_is_dropped_when_requests_end(tiny_hf_llama):
    engine = make_engine(tiny_hf_llama, num_blocks=16, block_size=4, max_num_batched_tokens=16,
                         async_scheduling=False)  # preemption and chunked prefill
    scheduler, runner = engine.scheduler, engine.runner
    for i, prompt in enumerate(random_prompts(8, 256, seed=22)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.8, seed=i, max_tokens=12))
    engine.abort_request("r7")  # never scheduled
    while engine.has_unfinished_requests():
        out = scheduler.schedule()
        result = runner.execute(out)
        held = runner.requests.states
        assert set(held) == {seq.request_id for seq in scheduler.running}
        updated = scheduler.update(out, result)
        for seq in scheduler.running:
            state = held[seq.request_id]
            assert state.block_ids == seq.block_table
            assert state.prompt_token_ids + state.output_token_ids == seq.token_ids()
        assert all(seq.request_id in held for seq, _ in updated if seq.is_finished)  # dropped next step
    engine.step()
    assert len(runner.requests) == 0 and not runner.requests.block_rows.row_of


def test_seeded_tokens_survive_preemption(tiny_hf_llama):
    params = SamplingParams(temperature=1.0, seed=99, max_tokens=12, ignore_eos=True)
    prompts = random_prompts(8, 256, seed=23)
    runs = []
    for num_blocks in (128, 16):
        engine = make_engine(tiny_hf_llama, num_blocks=num_blocks, block_size=4, async_scheduling=True)
        tokens = {f"r{i}": [] for i in range(len(prompts))}
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens[out.request_id].extend(out.new_token_ids)
        runs.append((tokens, engine.scheduler.num_preemptions))
    (roomy, none), (tight, some) = runs
    assert none == 0 and some > 0
    assert tight == roomy and all(len(t) == 12 for t in tight.values())
