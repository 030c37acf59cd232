"""The TensorRT-LLM adapter: importable everywhere, clear failure without tensorrt_llm, real runs only with it.

The translation functions (our SamplingParams -> SamplingConfig/Request keywords, responses -> core outputs,
the engine folder -> ModelInfo) are pure and tested here, and so is the text path: Executor-shaped
responses go through the same AsyncLLM and OutputProcessor as our own engine. Everything that touches
the Executor skips without tensorrt_llm.
"""

from __future__ import annotations

import asyncio
import enum
import importlib.util
import json
import os
import threading
import time
from types import SimpleNamespace

import pytest

from llmserve.backends.trtllm_mapping import (
    core_output,
    engine_info,
    model_info,
    request_kwargs,
    sampling_config_kwargs,
)
from llmserve.sampling_params import SamplingParams
from tests.helpers_tokenizer import tiny_byte_level_tokenizer

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None


class FinishReason(enum.Enum):  # stands in for tensorrt_llm.bindings.executor.FinishReason (same names)
    NOT_FINISHED = 0
    END_ID = 1
    LENGTH = 3
    CANCELLED = 5


def test_module_imports_without_tensorrt_llm():
    from llmserve.backends import trtllm

    assert trtllm.TrtllmEngine.__name__ == "TrtllmEngine"


@pytest.mark.skipif(HAS_TRTLLM, reason="tensorrt_llm is installed here")
def test_constructing_without_tensorrt_llm_names_what_is_missing(tmp_path):
    from llmserve.backends.trtllm import TrtllmEngine

    with pytest.raises(RuntimeError) as info:
        TrtllmEngine(tmp_path)
    message = str(info.value)
    assert "tensorrt_llm" in message and "NVIDIA" in message and "pypi.nvidia.com" in message


def test_greedy_maps_to_top_k_1():
    assert sampling_config_kwargs(SamplingParams(temperature=0.0)) == {"beam_width": 1, "top_k": 1}


def test_sampling_sends_top_p_even_at_1():
    # TensorRT-LLM treats top_k == top_p == 0 (their defaults) as greedy, so plain sampling must send top_p.
    kwargs = sampling_config_kwargs(SamplingParams(temperature=0.7))
    assert kwargs == {"beam_width": 1, "temperature": 0.7, "top_k": 0, "top_p": 1.0}


def test_sampling_knobs_and_penalties_map_by_name():
    params = SamplingParams(temperature=0.5, top_k=40, top_p=0.9, min_p=0.05, seed=-1, min_tokens=3,
                            repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5)
    assert sampling_config_kwargs(params) == {
        "beam_width": 1, "temperature": 0.5, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "seed": 2**64 - 1,
        "min_tokens": 3, "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": -0.5}


def test_request_keywords_eos_stop_ids_and_length():
    params = SamplingParams(max_tokens=None, stop_token_ids=[7])
    kwargs = request_kwargs([1, 2, 3], params, eos_token_ids=[2, 9], max_seq_len=100)
    assert kwargs == {"input_token_ids": [1, 2, 3], "max_tokens": 97, "streaming": True, "end_id": 2,
                      "pad_id": 2, "stop_words": [[7], [9]]}
    ignoring = request_kwargs([1], SamplingParams(max_tokens=5, ignore_eos=True), [2, 9], 100)
    assert (ignoring["end_id"], ignoring["max_tokens"], ignoring["stop_words"]) == (-1, 5, None)


def test_engine_info_reads_trtllm_build_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "version": "x", "pretrained_config": {"eos_token_id": [2, 9]}, "build_config": {"max_seq_len": 4096}}))
    assert engine_info(tmp_path) == ([2, 9], 4096)
    (tmp_path / "config.json").write_text(json.dumps({"build_config": {"max_seq_len": 512}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert engine_info(tmp_path) == ([5], 512)


def _response(ids, final, reason=FinishReason.NOT_FINISHED, request_id=0):
    result = SimpleNamespace(output_token_ids=[ids], is_final=final, finish_reasons=[reason])
    return SimpleNamespace(request_id=request_id, has_error=lambda: False, result=result)


def test_responses_become_core_outputs_with_finish_and_stop_reasons():
    first = core_output("r", _response([4, 5], False), {8})
    last = core_output("r", _response([8], True, FinishReason.END_ID), {8})
    assert (first.new_token_ids, first.finish_reason) == ([4, 5], None)
    assert (last.new_token_ids, last.finish_reason, last.stop_reason) == ([8], "stop", 8)
    assert core_output("s", _response([4], True, FinishReason.LENGTH), set()).finish_reason == "length"
    failed = SimpleNamespace(has_error=lambda: True, error_msg="out of KV blocks")
    assert core_output("r", failed, set()).finish_reason == "error"


def test_model_info_of_a_trtllm_build_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "pretrained_config": {"vocab_size": 400, "dtype": "bfloat16", "eos_token_id": 2},
        "build_config": {"max_seq_len": 2048, "max_batch_size": 64}}))
    info = model_info(tmp_path)
    assert (info.vocab_size, info.max_model_len, info.eos_token_ids, info.dtype, info.max_num_seqs,
            info.num_kv_blocks, info.tokenizer_path) == (400, 2048, [2], "bfloat16", 64, 0, str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"build_config": {}}))
    with pytest.raises(ValueError, match="vocab_size"):
        model_info(tmp_path)


class FakeExecutor:
    """Stands in for tensorrt_llm's Executor: each await_responses() gives every open request its next
    scripted token (the last one final, LENGTH); a cancelled request gets a final CANCELLED response."""

    def __init__(self, script: list[int]):
        self.script, self.cancelled, self._open, self._lock = script, [], {}, threading.Lock()

    def enqueue_request(self, request) -> int:
        with self._lock:
            trt_id = len(self.cancelled) + 100 + len(self._open)
            self._open[trt_id] = list(self.script)
        return trt_id

    def cancel_request(self, trt_id: int) -> None:
        self.cancelled.append(trt_id)

    def await_responses(self, timeout):
        time.sleep(0.005)
        responses = []
        with self._lock:
            for trt_id, left in list(self._open.items()):
                done = trt_id in self.cancelled or len(left) == 1
                reason = FinishReason.CANCELLED if trt_id in self.cancelled else FinishReason.LENGTH
                responses.append(_response([] if trt_id in self.cancelled else [left.pop(0)], done,
                                           reason if done else FinishReason.NOT_FINISHED, trt_id))
                if done:
                    del self._open[trt_id]
        return responses

    def shutdown(self) -> None:
        pass


def fake_executor_module(script: list[int]) -> SimpleNamespace:
    keywords = lambda **kwargs: kwargs  # noqa: E731
    return SimpleNamespace(Request=keywords, SamplingConfig=keywords, ExecutorConfig=keywords,
                           SchedulerConfig=keywords, KvCacheConfig=keywords,
                           CapacitySchedulerPolicy=SimpleNamespace(GUARANTEED_NO_EVICT=0),
                           ModelType=SimpleNamespace(DECODER_ONLY=0),
                           Executor=lambda path, model_type, config: FakeExecutor(script))


async def test_adapter_streams_text_through_the_output_processor_and_cancels_on_a_stop_string(tmp_path,
                                                                                              monkeypatch):
    from llmserve.backends import trtllm

    tokenizer = tiny_byte_level_tokenizer()
    script = tokenizer.encode("Hello world! The end", add_special_tokens=False)
    monkeypatch.setattr(trtllm, "import_executor", lambda: fake_executor_module(script))
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_config": {"vocab_size": len(tokenizer)}}))
    engine = trtllm.TrtllmEngine(tmp_path, tokenizer=tokenizer)
    await engine.start()
    try:
        whole = [o async for o in engine.generate("a", [1], SamplingParams(max_tokens=50))]
        stopped = [o async for o in engine.generate("b", [1], SamplingParams(max_tokens=50, stop=["ld!"]))]
        await asyncio.sleep(0.05)  # the cancel's stats reach the client
        num_running, executor = engine.stats().num_running, engine.core._executor
    finally:
        await engine.stop()
    assert "".join(o.new_text for o in whole) == "Hello world! The end"
    assert (whole[-1].finish_reason, whole[-1].num_output_tokens) == ("length", len(script))
    assert "".join(o.new_text for o in stopped) == "Hello wor"
    assert (stopped[-1].finish_reason, stopped[-1].stop_reason) == ("stop", "ld!")
    assert len(executor.cancelled) == 1, "TensorRT-LLM is told to stop the request a stop string ended"
    assert num_running == 0 and engine.core._executor is None


# ---- with tensorrt_llm only -------------------------------------------------------------------------

@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=5,
                                    top_p=0.9, min_p=0.1, seed=3, repetition_penalty=1.2, presence_penalty=0.1)])
def test_keywords_are_accepted_by_the_real_bindings(params):
    executor = pytest.importorskip("tensorrt_llm.bindings.executor")
    executor.Request(**request_kwargs([1, 2, 3], params, [2], 64),
                     sampling_config=executor.SamplingConfig(**sampling_config_kwargs(params)))


@pytest.fixture
def engine_dir():
    pytest.importorskip("tensorrt_llm")
    path = os.environ.get("LLMSERVE_TRTLLM_ENGINE_DIR")
    if not path:
        pytest.skip("set LLMSERVE_TRTLLM_ENGINE_DIR to a folder built by trtllm-build")
    return path


def test_streams_until_length_and_aborts(engine_dir):
    from llmserve.backends.trtllm import TrtllmEngine

    async def run():
        engine = TrtllmEngine(engine_dir)
        await engine.start()
        try:
            outs = [o async for o in engine.generate("a", [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=8,
                                                                                         ignore_eos=True))]
            assert outs[-1].finished and outs[-1].finish_reason == "length"
            assert sum(len(o.new_token_ids) for o in outs) == 8
            stream = engine.generate("b", [1, 2, 3, 4], SamplingParams(max_tokens=4096, ignore_eos=True))
            await stream.__anext__()
            engine.abort("b")
            rest = [o async for o in stream]
            assert rest[-1].finish_reason == "abort" and engine.stats().num_running == 0
        finally:
            await engine.stop()

    asyncio.run(run())


def test_logit_bias_is_refused_rather_than_ignored():
    with pytest.raises(ValueError, match="logit_bias is not supported"):
        request_kwargs([1], SamplingParams(logit_bias={5: 10.0}), [2], 100)
