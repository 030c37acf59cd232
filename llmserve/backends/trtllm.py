"""The EngineClient interface over TensorRT-LLM's Executor API: the server and tests drive it like our own engine.

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

Shape: `TrtllmCoreClient` plays the engine core (a CoreClient: token ids in, per-batch outputs back,
from a poller thread), and `TrtllmEngine` is AsyncLLM over it, so text, stop strings, logprobs and
finish reasons come from the same OutputProcessor as with our own engine. TensorRT-LLM cannot see
stop strings: the OutputProcessor finds them and AsyncLLM cancels the request here.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
import time
from pathlib import Path

from llmserve.backends.trtllm_mapping import core_output, model_info, request_kwargs, sampling_config_kwargs
from llmserve.core.messages import EngineCoreOutputs, EngineCoreRequest, SchedulerStats
from llmserve.frontend.async_llm import AsyncLLM
from llmserve.frontend.engine_client import EngineDeadError
from llmserve.frontend.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)
MISSING_MESSAGE = ("TrtllmEngine needs TensorRT-LLM: the Python package `tensorrt_llm` (from NVIDIA's index, "
                   "`pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com`), an NVIDIA GPU with its "
                   "driver, and an engine built by `llmserve build` with a `backend: trtllm` profile")


def import_executor():
    """`tensorrt_llm.bindings.executor`, or RuntimeError saying what is missing."""
    try:
        from tensorrt_llm.bindings import executor
    except ImportError as exc:
        raise RuntimeError(f"{MISSING_MESSAGE} ({exc})") from exc
    return executor


class TrtllmEngine(AsyncLLM):
    """An EngineClient serving a trtllm-build engine folder (its tokenizer files beside it, as our build puts them)."""

    def __init__(self, engine_dir: str | Path, *, tokenizer=None, **executor_options):
        core = TrtllmCoreClient(engine_dir, **executor_options)
        super().__init__(core, tokenizer if tokenizer is not None else load_tokenizer(engine_dir))


class TrtllmCoreClient:
    """A CoreClient over TensorRT-LLM's Executor; one poller thread turns its responses into core outputs."""

    def __init__(self, engine_dir: str | Path, *, kv_cache_free_gpu_memory_fraction: float = 0.9,
                 enable_block_reuse: bool = True, capacity_scheduler_policy: str = "GUARANTEED_NO_EVICT",
                 enable_chunked_context: bool = False, poll_timeout_ms: int = 100):
        self._trt = import_executor()  # fail at construction, not on the first request
        self.engine_dir = Path(engine_dir)
        self.info = model_info(self.engine_dir)
        self.kv_cache_free_gpu_memory_fraction = kv_cache_free_gpu_memory_fraction
        self.enable_block_reuse = enable_block_reuse
        self.capacity_scheduler_policy = capacity_scheduler_policy
        self.enable_chunked_context = enable_chunked_context  # needs use_paged_context_fmha in the build
        self.poll_timeout = datetime.timedelta(milliseconds=poll_timeout_ms)
        self._executor = None
        self._thread: threading.Thread | None = None
        self._running = threading.Event()
        self._lock = threading.Lock()  # guards the maps below (poller thread vs. event loop)
        self._request_ids: dict[int, tuple[str, set[int]]] = {}  # TensorRT-LLM id -> (ours, its stop token ids)
        self._trt_ids: dict[str, int] = {}
        self._num_received = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outputs: asyncio.Queue = asyncio.Queue()

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the engine onto the GPU (in a thread) and start polling responses."""
        assert self._executor is None, "TrtllmCoreClient already started"
        self._loop = asyncio.get_running_loop()
        self._executor = await asyncio.to_thread(self._make_executor)
        self._running.set()
        self._thread = threading.Thread(target=self._poll, name="trtllm-responses", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop polling, cancel what still runs, release the executor."""
        self._running.clear()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._executor is not None:
            self.abort_requests(list(self._trt_ids))
            await asyncio.to_thread(self._executor.shutdown)
            self._executor = None

    @property
    def is_alive(self) -> bool:
        return self._running.is_set()

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
    def add_request(self, request: EngineCoreRequest) -> None:
        """Enqueue in the Executor (queue_timeout is not supported: TensorRT-LLM schedules on its own)."""
        params = request.params
        trt_request = self._trt.Request(
            **request_kwargs(request.prompt_token_ids, params, self.info.eos_token_ids, self.info.max_model_len),
            sampling_config=self._trt.SamplingConfig(**sampling_config_kwargs(params)))
        with self._lock:  # the poller looks ids up under this lock, so no response beats the mapping
            trt_id = self._executor.enqueue_request(trt_request)
            self._request_ids[trt_id] = (request.request_id, set(params.stop_token_ids))
            self._trt_ids[request.request_id] = trt_id
            self._num_received += 1

    def abort_requests(self, request_ids: list[str]) -> None:
        cancelled = False
        for request_id in request_ids:
            with self._lock:
                trt_id = self._trt_ids.pop(request_id, None)
                self._request_ids.pop(trt_id, None)
            if trt_id is not None and self._executor is not None:
                self._executor.cancel_request(trt_id)
                cancelled = True
        if cancelled and self._loop is not None:  # the client's counts must not wait for the next response
            self._publish(self._outputs_of([]))

    async def get_output(self) -> EngineCoreOutputs:
        item = await self._outputs.get()
        if isinstance(item, EngineDeadError):
            raise item
        return item

    # ---- the poller thread ------------------------------------------------------------------
    def _poll(self) -> None:
        # Own thread: await_responses blocks up to poll_timeout, then the loop re-checks shutdown().
        try:
            while self._running.is_set():
                responses = self._executor.await_responses(timeout=self.poll_timeout)
                if responses:
                    self._publish(self._outputs_of(responses))
        except Exception as exc:  # noqa: BLE001 (the executor failed: every open request must end)
            logger.exception("TensorRT-LLM's executor failed")
            self._running.clear()
            self._publish(EngineDeadError(f"TensorRT-LLM's executor failed: {exc}"))

    def _outputs_of(self, responses) -> EngineCoreOutputs:
        outputs = []
        with self._lock:
            for response in responses:
                known = self._request_ids.get(response.request_id)
                if known is None:
                    continue  # cancelled here already
                request_id, stop_token_ids = known
                if response.has_error():
                    logger.error("TensorRT-LLM failed request %s: %s", request_id, response.error_msg)
                output = core_output(request_id, response, stop_token_ids)
                if output.finished:
                    del self._request_ids[response.request_id], self._trt_ids[request_id]
                outputs.append(output)
            stats = SchedulerStats(num_running=len(self._trt_ids))
            return EngineCoreOutputs(outputs, stats, time.time(), self._num_received)

    def _publish(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._outputs.put_nowait, item)
        except RuntimeError:
            pass  # the event loop is closed; nobody is listening
