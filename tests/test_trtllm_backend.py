"""The TensorRT-LLM adapter: importable everywhere, clear failure without tensorrt_llm, real runs only with it.

The translation functions (our SamplingParams -> SamplingConfig/Request keywords, responses -> RequestOutput)
are pure and tested here; everything that touches the Executor skips without tensorrt_llm.
"""

from __future__ import annotations

import asyncio
import enum
import importlib.util
import json
import os
from types import SimpleNamespace

import pytest

from llmserve.backends.trtllm_mapping import (
    RequestStream,
    engine_info,
    request_kwargs,
    sampling_config_kwargs,
)
from llmserve.sampling_params import SamplingParams

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None


class FinishReason(enum.Enum):  # stands in for tensorrt_llm.bindings.executor.FinishReason (same names)
    NOT_FINISHED = 0
    END_ID = 1
    LENGTH = 3


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


def test_request_stream_turns_responses_into_deltas():
    stream = RequestStream("r", [1, 2, 3], SamplingParams(stop_token_ids=[8]), tokenizer=None)

    def response(ids, final, reason=FinishReason.NOT_FINISHED):
        result = SimpleNamespace(output_token_ids=[ids], is_final=final, finish_reasons=[reason])
        return SimpleNamespace(has_error=lambda: False, result=result)

    first = stream.step(response([4, 5], False))
    last = stream.step(response([8], True, FinishReason.END_ID))
    assert (first.new_token_ids, first.finished, first.num_output_tokens) == ([4, 5], False, 2)
    assert (last.new_token_ids, last.finished, last.finish_reason, last.stop_reason,
            last.num_prompt_tokens, last.num_output_tokens) == ([8], True, "stop", 8, 3, 3)
    length = RequestStream("s", [1], SamplingParams(), None).step(response([4], True, FinishReason.LENGTH))
    assert length.finish_reason == "length"
    failed = SimpleNamespace(has_error=lambda: True, error_msg="out of KV blocks")
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        stream.step(failed)


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
            assert rest[-1].finish_reason == "abort" and engine.num_running_requests == 0
        finally:
            await engine.stop()

    asyncio.run(run())
