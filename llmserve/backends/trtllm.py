"""An adapter from llmserve's streaming engine interface to TensorRT-LLM's Executor API.

WRITTEN AGAINST THE DOCUMENTED API, NEVER EXECUTED: no machine of this project has tensorrt_llm.
API names were checked (with the code-search tool) against TensorRT-LLM's
`tensorrt_llm/runtime/model_runner_cpp.py` (Executor(Path, ModelType.DECODER_ONLY, ExecutorConfig(...)),
ExecutorConfig(max_beam_width=, kv_cache_config=), SamplingConfig keyword names incl. `seed` (renamed from
`random_seed`), Request(input_token_ids=, max_tokens=, pad_id=, end_id=, stop_words=, sampling_config=,
streaming=, output_config=), enqueue_request(s), await_responses, response.result.is_final) and
`docs/source/advanced/executor.md` as summarised in shared/notes/trtllm-and-peers.md §2 (KvCacheConfig
free_gpu_memory_fraction / enable_block_reuse, cancel_request, has_error()/error_msg,
result.output_token_ids[beam], result.finish_reasons, streaming results carrying only new tokens).
tensorrt_llm is imported lazily: importing this module never needs it; constructing an engine does.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from llmserve.engine.engine import RequestOutput
from llmserve.sampling_params import SamplingParams

MISSING_MESSAGE = ("TrtllmEngine needs TensorRT-LLM: the Python package `tensorrt_llm` (from NVIDIA's index, "
                   "`pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com`), an NVIDIA GPU with its "
                   "driver, and an engine built by `llmserve build` with a `backend: trtllm` profile")
# TensorRT-LLM FinishReason names -> our finish_reason strings (vLLM vocabulary).
FINISH_REASONS = {"END_ID": "stop", "STOP_WORDS": "stop", "LENGTH": "length", "TIMED_OUT": "abort",
                  "CANCELLED": "abort"}
_DONE = object()  # queue sentinel: the request has no more outputs


def import_executor():
    """`tensorrt_llm.bindings.executor`, or RuntimeError saying what is missing."""
    try:
        from tensorrt_llm.bindings import executor
    except ImportError as exc:
        raise RuntimeError(f"{MISSING_MESSAGE} ({exc})") from exc
    return executor


class TrtllmEngine:
    """Streams tokens from a TensorRT-LLM engine folder; one poller thread feeds per-request asyncio queues."""

    def __init__(self, engine_dir: str | Path, kv_cache_free_gpu_memory_fraction: float = 0.9,
                 enable_block_reuse: bool = True, max_beam_width: int = 1, end_id: int | None = None,
                 pad_id: int | None = None, tokenizer=None, poll_timeout_ms: int = 100):
        self._trt = import_executor()  # fail at construction, not on the first request
        self.engine_dir = Path(engine_dir)
        self.kv_cache_free_gpu_memory_fraction = kv_cache_free_gpu_memory_fraction
        self.enable_block_reuse = enable_block_reuse
        self.max_beam_width = max_beam_width
        self.end_id = end_id if end_id is not None else _eos_from_engine_config(self.engine_dir)
        self.pad_id = pad_id if pad_id is not None else self.end_id
        self.tokenizer = tokenizer  # optional: without it, outputs carry token ids and empty text
        self.poll_timeout = datetime.timedelta(milliseconds=poll_timeout_ms)
        self._executor = None
        self._thread: threading.Thread | None = None
        self._running = threading.Event()
        self._lock = threading.Lock()  # guards the two maps below (poller thread vs. event loop)
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._trt_ids: dict[str, int] = {}

    def start(self) -> None:
        """Load the engine onto the GPU and start polling responses."""
        trt = self._trt
        kv_cache = trt.KvCacheConfig(free_gpu_memory_fraction=self.kv_cache_free_gpu_memory_fraction,
                                     enable_block_reuse=self.enable_block_reuse)
        config = trt.ExecutorConfig(max_beam_width=self.max_beam_width, kv_cache_config=kv_cache)
        self._executor = trt.Executor(self.engine_dir, trt.ModelType.DECODER_ONLY, config)
        self._running.set()
        self._thread = threading.Thread(target=self._poll, name="trtllm-responses", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling, end every open stream with 'abort', release the executor."""
        self._running.clear()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            queues, self._queues, self._trt_ids = list(self._queues.values()), {}, {}
        for loop, queue in queues:
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Enqueue one request and yield a RequestOutput per streamed step; the last has finished=True."""
        if self._executor is None:
            raise RuntimeError("TrtllmEngine.start() was not called")
        if params.n != 1:
            raise ValueError("TrtllmEngine supports n=1 only (fan out n>1 requests above it)")
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            trt_id = self._executor.enqueue_request(self._request(prompt_token_ids, params))
            self._queues[trt_id] = (asyncio.get_running_loop(), queue)
            self._trt_ids[request_id] = trt_id
        stream = _Stream(request_id, prompt_token_ids, params, self.tokenizer)
        try:
            while (response := await queue.get()) is not _DONE:
                output = stream.step(response)
                if stream.hit_stop_string and not output.finished:
                    self.abort(request_id)  # TensorRT-LLM cannot see stop strings; we end it here
                    output.finished, output.finish_reason = True, "stop"
                yield output
                if output.finished:
                    return
            yield stream.aborted()
        finally:
            self._forget(request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a running request; its stream ends with finish_reason 'abort' (or as already finished)."""
        with self._lock:
            trt_id = self._trt_ids.get(request_id)
        if trt_id is not None and self._executor is not None:
            self._executor.cancel_request(trt_id)

    def _request(self, prompt_token_ids: list[int], params: SamplingParams):
        trt = self._trt
        sampling = trt.SamplingConfig(
            beam_width=1, top_k=params.top_k or None, top_p=params.top_p if params.top_p < 1.0 else None,
            temperature=params.temperature if not params.greedy else None, seed=params.seed,
            repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, min_tokens=params.min_tokens or None)
        if params.greedy:
            sampling.top_k = 1  # greedy in TensorRT-LLM is top_k=1
        stop_words = [[token] for token in params.stop_token_ids] or None
        return trt.Request(input_token_ids=list(prompt_token_ids), max_tokens=params.max_tokens or 1 << 20,
                           streaming=True, sampling_config=sampling,
                           end_id=-1 if params.ignore_eos else self.end_id,  # -1: never matches
                           pad_id=self.pad_id, stop_words=stop_words)

    def _poll(self) -> None:
        # Runs on its own thread: await_responses blocks up to poll_timeout, then checks for stop().
        while self._running.is_set():
            for response in self._executor.await_responses(timeout=self.poll_timeout):
                with self._lock:
                    target = self._queues.get(response.request_id)
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, response)

    def _forget(self, request_id: str) -> None:
        with self._lock:
            trt_id = self._trt_ids.pop(request_id, None)
            self._queues.pop(trt_id, None)


class _Stream:
    """Per-request state: turns TensorRT-LLM responses (new tokens only) into RequestOutputs."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, tokenizer):
        from llmserve.engine.detokenizer import IncrementalDetokenizer

        self.request_id = request_id
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_output_tokens = 0
        self.detokenizer = None if tokenizer is None else IncrementalDetokenizer(
            tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output)

    @property
    def hit_stop_string(self) -> bool:
        return self.detokenizer is not None and self.detokenizer.stop_reason is not None

    def step(self, response) -> RequestOutput:
        if response.has_error():
            raise RuntimeError(f"TensorRT-LLM request {self.request_id} failed: {response.error_msg}")
        result = response.result
        new_ids = list(result.output_token_ids[0])  # beam 0; streaming results hold only new tokens
        self.num_output_tokens += len(new_ids)
        text = self.detokenizer.add_tokens(new_ids) if self.detokenizer else ""
        reason = _finish_reason(result) if result.is_final else None
        if result.is_final and self.detokenizer:
            text += self.detokenizer.finish()
        stop_reason = self.detokenizer.stop_reason if self.detokenizer else None
        return RequestOutput(self.request_id, new_ids, text, finished=bool(result.is_final), finish_reason=reason,
                             stop_reason=stop_reason, num_prompt_tokens=self.num_prompt_tokens,
                             num_output_tokens=self.num_output_tokens)

    def aborted(self) -> RequestOutput:
        return RequestOutput(self.request_id, [], "", finished=True, finish_reason="abort",
                             num_prompt_tokens=self.num_prompt_tokens, num_output_tokens=self.num_output_tokens)


def _finish_reason(result) -> str:
    reasons = list(getattr(result, "finish_reasons", []) or [])
    name = getattr(reasons[0], "name", str(reasons[0])) if reasons else "END_ID"
    return FINISH_REASONS.get(name.rsplit(".", 1)[-1], "stop")


def _eos_from_engine_config(engine_dir: Path) -> int | None:
    # trtllm-build writes {version, pretrained_config, build_config}; our converter puts eos_token_id in
    # pretrained_config, which TensorRT-LLM carries through as an extra field (an assumption, not verified).
    path = engine_dir / "config.json"
    if not path.is_file():
        return None
    eos = json.loads(path.read_text()).get("pretrained_config", {}).get("eos_token_id")
    return eos[0] if isinstance(eos, list) else eos
