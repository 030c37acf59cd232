"""The TensorRT-LLM adapter: importable everywhere, clear failure without tensorrt_llm, real runs only with it."""

from __future__ import annotations

import asyncio
import importlib.util
import os

import pytest

from llmserve.sampling_params import SamplingParams

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None


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
        engine.start()
        try:
            outs = [o async for o in engine.generate("a", [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=8,
                                                                                         ignore_eos=True))]
            assert outs[-1].finished and outs[-1].finish_reason == "length"
            assert sum(len(o.new_token_ids) for o in outs) == 8
            stream = engine.generate("b", [1, 2, 3, 4], SamplingParams(max_tokens=4096, ignore_eos=True))
            first = await stream.__anext__()
            engine.abort("b")
            rest = [o async for o in stream]
            assert (rest or [first])[-1].finish_reason == "abort"
        finally:
            engine.stop()

    asyncio.run(run())
