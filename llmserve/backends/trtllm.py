"""An adapter from llmserve's AsyncEngine interface to TensorRT-LLM's Executor API.

WRITTEN AGAINST THE DOCUMENTED API, NEVER EXECUTED: no machine of this project has tensorrt_llm.
Names checked with the code-search tool against NVIDIA/TensorRT-LLM:
- `cpp/tensorrt_llm/pybind/executor/executor.cpp`: Executor(model_path, model_type, executor_config),
  enqueue_request(request) -> id, await_responses(timeout=timedelta|None), cancel_request(id), shutdown().
- `.../executorConfig.cpp`: ExecutorConfig(max_beam_width=, scheduler_config=, kv_cache_config=,
  enable_chunked_context=), KvCacheConfig(enable_block_reuse=, free_gpu_memory_fraction=),
  SchedulerConfig(capacity_scheduler_policy=); `bindings.cpp`: CapacitySchedulerPolicy.{GUARANTEED_NO_EVICT,
  MAX_UTILIZATION}, ModelType.DECODER_ONLY.
- `.../request.cpp`: SamplingConfig(beam_width, *, top_k, top_p, seed, temperature, min_tokens,
  repetition_penalty, presence_penalty, frequency_penalty, min_p, ...); Request(input_token_ids, max_tokens,
  *, streaming, sampling_config, end_id, pad_id, stop_words=[[ids]]); Response.request_id, has_error(),
  error_msg, result.{output_token_ids[beam], is_final, finish_reasons}; FinishReason.{END_ID, STOP_WORDS,
  LENGTH, TIMED_OUT, CANCELLED}.
- `tensorrt_llm/executor/base_worker.py`: ignore_eos is sent as end_id=-1; an await-responses thread beside
  the submitting thread is how TensorRT-LLM itself drives the Executor.
- `docs/source/advanced/gpt-runtime.md`: "If both topK and topP are zero, greedy search is performed".
tensorrt_llm is imported lazily: importing this module never needs it; constructing an engine does.
"""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from llmserve.backends.trtllm_mapping import (
    RequestStream,
    engine_info,
    request_kwargs,
    sampling_config_kwargs,
)
from llmserve.engine.engine import RequestOutput
from llmserve.sampling_params import SamplingParams

MISSING_MESSAGE = ("TrtllmEngine needs TensorRT-LLM: the Python package `tensorrt_llm` (from NVIDIA's index, "
                   "`pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com`), an NVIDIA GPU with its "
                   "driver, and an engine built by `llmserve build` with a `backend: trtllm` profile")
_ABORTED = object()  # queue sentinel: the request was aborted or the engine stopped


def import_executor():
    """`tensorrt_llm.bindings.executor`, or RuntimeError saying what is missing."""
    try:
        from tensorrt_llm.bindings import executor
    except ImportError as exc:
        raise RuntimeError(f"{MISSING_MESSAGE} ({exc})") from exc
    return executor


class TrtllmEngine:
    """AsyncEngine's interface over a TensorRT-LLM engine; one poller thread feeds per-request asyncio queues."""

    def __init__(self, engine_dir: str | Path, *, kv_cache_free_gpu_memory_fraction: float = 0.9,
                 enable_block_reuse: bool = True, capacity_scheduler_policy: str = "GUARANTEED_NO_EVICT",
                 enable_chunked_context: bool = False, tokenizer=None, poll_timeout_ms: int = 100):
        self._trt = import_executor()  # fail at construction, not on the first request
        self.engine_dir = Path(engine_dir)
        self.eos_token_ids, self.max_seq_len = engine_info(self.engine_dir)
        self.kv_cache_free_gpu_memory_fraction = kv_cache_free_gpu_memory_fraction
        self.enable_block_reuse = enable_block_reuse
        self.capacity_scheduler_policy = capacity_scheduler_policy
        self.enable_chunked_context = enable_chunked_context  # needs use_paged_context_fmha in the build
        self.tokenizer = tokenizer  # optional: without it, outputs carry token ids and empty text
        self.poll_timeout = datetime.timedelta(milliseconds=poll_timeout_ms)
        self._executor = None
        self._thread: threading.Thread | None = None
        self._running = threading.Event()
        self._lock = threading.Lock()  # guards the two maps below (poller thread vs. event loop)
        self._routes: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._trt_ids: dict[str, int] = {}

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the engine onto the GPU (in a thread) and start polling responses."""
        assert self._executor is None, "TrtllmEngine already started"
        self._executor = await asyncio.to_thread(self._make_executor)
        self._running.set()
        self._thread = threading.Thread(target=self._poll, name="trtllm-responses", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop polling, end every open stream with 'abort', release the executor."""
        self._running.clear()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        with self._lock:
            routes, self._routes, self._trt_ids = list(self._routes.values()), {}, {}
        for loop, queue in routes:
            loop.call_soon_threadsafe(queue.put_nowait, _ABORTED)
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown)
            self._executor = None

    @property
    def is_running(self) -> bool:
        return self._running.is_set()

    @property
    def num_running_requests(self) -> int:
        return len(self._trt_ids)  # TensorRT-LLM queues and schedules internally; all open ones count

    @property
    def num_waiting_requests(self) -> int:
        return 0

    def _make_executor(self):
        trt = self._trt
        config = trt.ExecutorConfig(
            max_beam_width=1,
            scheduler_config=trt.SchedulerConfig(
                capacity_scheduler_policy=getattr(trt.CapacitySchedulerPolicy, self.capacity_scheduler_policy)),
            kv_cache_config=trt.KvCacheConfig(enable_block_reuse=self.enable_block_reuse,
                                              free_gpu_memory_fraction=self.kv_cache_free_gpu_memory_fraction),
            enable_chunked_context=self.enable_chunked_context)
        return trt.Executor(self.engine_dir, trt.ModelType.DECODER_ONLY, config)

    # ---- requests -------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield the request's deltas until it finishes; closing the iterator aborts it."""
        if not self.is_running:
            raise RuntimeError("TrtllmEngine is not running (call start())")
        if request_id in self._trt_ids:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.n != 1:
            raise ValueError("TrtllmEngine supports n=1 only (fan out n>1 requests above it)")
        request = self._trt.Request(**request_kwargs(prompt_token_ids, params, self.eos_token_ids, self.max_seq_len),
                                    sampling_config=self._trt.SamplingConfig(**sampling_config_kwargs(params)))
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:  # the poller looks routes up under this lock, so no response beats the route
            trt_id = self._executor.enqueue_request(request)
            self._routes[trt_id] = (asyncio.get_running_loop(), queue)
            self._trt_ids[request_id] = trt_id
        stream, finished = RequestStream(request_id, prompt_token_ids, params, self.tokenizer), False
        try:
            while not finished:
                item = await queue.get()
                output = stream.aborted() if item is _ABORTED else stream.step(item)
                if stream.hit_stop_string and not output.finished:
                    self._cancel(request_id)  # TensorRT-LLM cannot see stop strings; we end it here
                    output.finished, output.finish_reason = True, "stop"
                finished = output.finished
                yield output
        finally:
            if not finished:
                self.abort(request_id)
            self._cancel(request_id, quiet=True)

    def abort(self, request_id: str) -> None:
        """End a request now: TensorRT-LLM cancels it; its stream ends with finish_reason 'abort'."""
        route = self._cancel(request_id)
        if route is not None:
            loop, queue = route
            loop.call_soon_threadsafe(queue.put_nowait, _ABORTED)

    def _cancel(self, request_id: str, quiet: bool = False):
        with self._lock:
            trt_id = self._trt_ids.pop(request_id, None)
            route = self._routes.pop(trt_id, None)
        if trt_id is not None and not quiet and self._executor is not None:
            self._executor.cancel_request(trt_id)
        return route

    def _poll(self) -> None:
        # Own thread: await_responses blocks up to poll_timeout, then the loop re-checks stop().
        while self._running.is_set():
            for response in self._executor.await_responses(timeout=self.poll_timeout):
                with self._lock:
                    route = self._routes.get(response.request_id)
                if route is not None:
                    loop, queue = route
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, response)
                    except RuntimeError:
                        pass  # that request's event loop is closed; nobody is listening
