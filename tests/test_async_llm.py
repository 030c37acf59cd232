"""AsyncLLM over the in-process core client: streams, stop strings ending requests in the core, exact
waiting counts, queue timeouts, and failures (a broken step, broken output handling) that end every
open stream at once instead of leaving it hanging."""

from __future__ import annotations

import asyncio

import pytest

from llmserve.frontend.async_llm import AsyncLLM
from llmserve.frontend.engine_client import EngineDeadError, QueueTimeoutError
from llmserve.frontend.inproc_core_client import InprocCoreClient
from llmserve.sampling_params import SamplingParams
from tests.conftest import make_engine, make_hf_llama
from tests.helpers_tokenizer import tiny_byte_level_tokenizer

TOKENIZER = tiny_byte_level_tokenizer()
PROMPT = TOKENIZER.encode("Hello world!", add_special_tokens=False)


def greedy(max_tokens: int, **fields) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **fields)


class BreakableTokenizer:
    """The test tokenizer, decoding by windows, until the test breaks it (a bug in output handling)."""

    def __init__(self):
        self.broken = False

    def decode(self, *args, **kwargs):
        if self.broken:
            raise RuntimeError("decoder exploded")
        return TOKENIZER.decode(*args, **kwargs)


@pytest.fixture
def engine():
    hf = make_hf_llama(0, vocab_size=len(TOKENIZER), eos_token_id=TOKENIZER.eos_token_id)
    return make_engine(hf, num_blocks=64, block_size=4, max_num_seqs=4, tokenizer=TOKENIZER)


async def started(engine, tokenizer=TOKENIZER) -> AsyncLLM:
    client = AsyncLLM(InprocCoreClient(engine.core), tokenizer)
    await client.start()
    return client


async def collect(client: AsyncLLM, request_id: str, params: SamplingParams, **kwargs):
    return [output async for output in client.generate(request_id, PROMPT, params, **kwargs)]


async def error_of(stream, timeout: float = 2.0) -> BaseException:
    """Read `stream` (what was already produced, then nothing more) until it raises; its exception."""
    try:
        async with asyncio.timeout(timeout):
            async for output in stream:
                assert not output.finished, "the stream ended without an error"
    except TimeoutError:
        raise AssertionError("the stream hangs") from None
    except Exception as exc:  # noqa: BLE001 (what the test checks)
        return exc
    raise AssertionError("the stream ended without an error")


async def until(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_concurrent_streams_end_with_their_text_and_free_every_block(engine):
    client = await started(engine)
    first, second = await asyncio.gather(collect(client, "a", greedy(6)), collect(client, "b", greedy(9)))
    assert [len(first), len(second)] == [6, 9] and first[-1].finish_reason == second[-1].finish_reason == "length"
    assert "".join(o.new_text for o in second) == TOKENIZER.decode(sum((o.new_token_ids for o in second), []))
    await until(lambda: client.stats().kv_blocks_used == 0)
    assert engine.kv.num_used_blocks == 0 and client.stats().num_generation_tokens_total == 15
    await client.stop()
    assert not client.is_running


async def test_a_stop_string_ends_the_request_in_the_core_too(engine):
    client = await started(engine)
    text = "".join(o.new_text for o in await collect(client, "free", greedy(12)))
    stop = text[len(text) // 2:len(text) // 2 + 2]
    outputs = await collect(client, "stopped", greedy(400, stop=[stop]))
    assert outputs[-1].finish_reason == "stop" and outputs[-1].stop_reason == stop
    assert "".join(o.new_text for o in outputs) == text[:text.index(stop)]
    await until(lambda: not engine.core.requests)  # aborted there: no 200 tokens generated for nothing
    assert engine.kv.num_used_blocks == 0 and engine.num_generation_tokens_total < 12 + 12
    await client.stop()


async def test_waiting_counts_requests_on_their_way_and_in_the_core_queue(engine):
    engine.scheduler.config.max_num_seqs = 1  # one runs, the others wait
    client = await started(engine)
    streams = [client.generate(f"r{i}", PROMPT, greedy(30)) for i in range(3)]
    firsts = [asyncio.ensure_future(s.__anext__()) for s in streams]
    await asyncio.sleep(0)  # each generate() has sent its request; the core has not taken them yet
    assert client.num_waiting_requests == 3
    await firsts[0]
    assert client.num_waiting_requests == 2 and client.stats().num_running == 1
    await client.stop()
    await asyncio.gather(*firsts, return_exceptions=True)
    assert engine.kv.num_used_blocks == 0


async def test_a_request_never_scheduled_within_its_queue_timeout_fails_and_a_running_one_goes_on(engine):
    engine.scheduler.config.max_num_seqs = 1
    client = await started(engine)
    running = client.generate("running", PROMPT, greedy(200), queue_timeout=0.05)
    outputs = [await running.__anext__()]  # it runs: the timeout no longer applies to it
    with pytest.raises(QueueTimeoutError, match="0.05 s"):
        await collect(client, "waiting", greedy(3), queue_timeout=0.05)
    outputs += [output async for output in running]
    # it was not read while the other waited: its deltas of that time arrive merged, none lost
    assert outputs[-1].finish_reason == "length" and sum(len(o.new_token_ids) for o in outputs) == 200
    assert outputs[-1].num_output_tokens == 200
    assert engine.num_generation_tokens_total == 200, "the timed-out request never ran"
    await client.stop()


async def test_a_failing_step_ends_every_open_stream_with_engine_dead_error(engine):
    client = await started(engine)
    streams = [client.generate(f"r{i}", PROMPT, greedy(200)) for i in range(3)]
    for stream in streams:
        await stream.__anext__()

    def broken_step():
        raise RuntimeError("CUDA error: an illegal memory access")

    engine.core.step = broken_step
    for stream in streams:
        error = await error_of(stream)
        assert isinstance(error, EngineDeadError) and "illegal memory access" in str(error)
    assert not client.is_running
    with pytest.raises(EngineDeadError):
        await collect(client, "late", greedy(2))
    await client.stop()


async def test_a_failure_in_output_handling_ends_every_open_stream_and_frees_the_core(engine):
    tokenizer = BreakableTokenizer()
    client = await started(engine, tokenizer)
    streams = [client.generate(f"r{i}", PROMPT, greedy(200)) for i in range(3)]
    for stream in streams:
        await stream.__anext__()
    tokenizer.broken = True
    for stream in streams:
        error = await error_of(stream)
        assert isinstance(error, EngineDeadError) and "decoder exploded" in str(error)
    assert not client.is_running
    await until(lambda: not engine.core.requests)  # the core was told to stop them
    assert engine.kv.num_used_blocks == 0
    await client.stop()


async def test_stop_ends_open_streams_with_abort_and_frees_every_block(engine):
    client = await started(engine)
    stream = client.generate("a", PROMPT, greedy(200))
    await stream.__anext__()
    await client.stop()
    rest = [output async for output in stream]
    assert rest[-1].finish_reason == "abort" and engine.kv.num_used_blocks == 0
    assert not engine.has_unfinished_requests()


async def test_a_reader_that_falls_behind_gets_the_missed_deltas_merged_in_order(engine):
    client = await started(engine)
    live = [output async for output in client.generate("live", PROMPT, greedy(24))]
    late_stream = client.generate("late", PROMPT, greedy(24))
    first = await late_stream.__anext__()
    await asyncio.sleep(0.5)  # the engine runs on; the reader does not
    late = [first] + [output async for output in late_stream]
    assert len(late) < len(live) == 24, "nothing was merged: the reader was never behind"
    assert [t for o in late for t in o.new_token_ids] == [t for o in live for t in o.new_token_ids]
    assert "".join(o.new_text for o in late) == "".join(o.new_text for o in live)
    assert late[-1].finished and late[-1].finish_reason == "length" and late[-1].num_output_tokens == 24
    await client.stop()


def test_merged_deltas_keep_every_field_of_both():
    """A stream read slower than the engine steps gets its deltas merged: nothing of either may be lost
    (the prompt's logprobs came only with the first delta, and were once dropped here)."""
    import dataclasses

    from llmserve.core.sampled_token import SampledToken
    from llmserve.frontend.async_llm import merge_outputs
    from llmserve.frontend.engine_client import RequestOutput

    prompt = [SampledToken(7, -1.5, [(7, -1.5)], 1)]
    first = RequestOutput("r", [1], "a", num_prompt_tokens=2, num_output_tokens=1,
                          new_logprobs=[SampledToken(1, -0.1)], prompt_logprobs=prompt)
    then = RequestOutput("r", [2, 3], "bc", True, "stop", 3, 2, 3, 1, [SampledToken(2, -0.2), SampledToken(3, -0.3)])
    merged = merge_outputs(first, then)
    assert merged == RequestOutput("r", [1, 2, 3], "abc", True, "stop", 3, 2, 3, 1,
                                   first.new_logprobs + then.new_logprobs, prompt)
    covered = {"request_id", "new_token_ids", "new_text", "new_logprobs", "prompt_logprobs"}
    assert covered | {f.name for f in dataclasses.fields(RequestOutput) if getattr(merged, f.name) == getattr(then, f.name)} \
        == {f.name for f in dataclasses.fields(RequestOutput)}  # every other field is the later delta's
