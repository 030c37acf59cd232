"""AsyncLLM: the EngineClient the server uses, over any CoreClient (in this process or another one).

`generate()` sends the request to the core and reads its own OutputStream. One output-handler task
reads the core's per-step messages, turns them into text deltas with the OutputProcessor, routes
each delta to its request's stream and tells the core to stop the requests a stop string ended.
When the core dies, or output handling fails, every open request ends with EngineDeadError at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from llmserve.core.messages import EngineCoreOutputs, EngineCoreRequest, ModelInfo, SchedulerStats
from llmserve.core.request_check import check_request
from llmserve.frontend.core_client import CoreClient
from llmserve.frontend.engine_client import EngineDeadError, QueueTimeoutError, RequestOutput
from llmserve.frontend.output_processor import OutputProcessor
from llmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
# finish reasons that end a stream with an error instead of a final delta
QUEUE_TIMEOUT = "queue_timeout"  # never scheduled within its queue timeout
MAX_STEPS_PER_TURN = 64  # steps processed at once before the readers get the loop (bounds their wait)
ERROR = "error"  # the engine failed this request alone (TensorRT-LLM reports such errors; its log says why)


class AsyncLLM:
    """Many concurrent `generate()` streams over one engine core; lives on one event loop."""

    def __init__(self, core: CoreClient, tokenizer=None):
        self.core = core
        self.tokenizer = tokenizer
        self.processor = OutputProcessor(tokenizer)
        self._streams: dict[str, OutputStream] = {}  # request id -> its undelivered deltas
        self._handler: asyncio.Task | None = None
        self._dead: EngineDeadError | None = None
        self._stats = SchedulerStats()
        self._num_sent = 0  # requests sent to the core
        self._num_received = 0  # of those, how many the core had taken when it computed `_stats`

    @property
    def info(self) -> ModelInfo:
        return self.core.info

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        assert self._handler is None, "AsyncLLM is already started"
        await self.core.start()
        self._handler = asyncio.create_task(self._handle_outputs(), name="llmserve-output-handler")

    async def stop(self) -> None:
        """Abort every open request (each ends with 'abort'), stop the output handler and the core."""
        for request_id in list(self._streams):
            self.abort(request_id)
        if self._handler is not None:
            self._handler.cancel()
            await asyncio.gather(self._handler, return_exceptions=True)
        self._dead = self._dead or EngineDeadError("the engine is stopped")
        await self.core.shutdown()

    @property
    def is_running(self) -> bool:
        return (self._handler is not None and not self._handler.done() and self._dead is None
                and self.core.is_alive)

    # ---- requests -------------------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError when the request can never run (empty prompt, ids out of range, too long)."""
        check_request(self.info, prompt_token_ids, params)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                       queue_timeout: float | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's deltas until it finishes; closing the iterator early aborts it."""
        stream = self._send(request_id, prompt_token_ids, params, queue_timeout)
        finished = False
        try:
            while not finished:
                item = await stream.get()
                finished = item.finished
                if item.finish_reason in (QUEUE_TIMEOUT, ERROR):
                    raise _stream_error(item.finish_reason, queue_timeout)
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def _send(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
              queue_timeout: float | None) -> "OutputStream":
        """Check the request, track it and queue it for the core, with no await in between."""
        if not self.is_running:
            raise self._dead or EngineDeadError("the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_token_ids, params)
        self.processor.add_request(request_id, prompt_token_ids, params)
        stream = OutputStream()
        self._streams[request_id] = stream
        self.core.add_request(EngineCoreRequest(request_id, list(prompt_token_ids), params, time.time(),
                                                queue_timeout))
        self._num_sent += 1
        return stream

    def abort(self, request_id: str) -> None:
        """End the request now; its stream yields a final 'abort' delta and the core frees its blocks."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        final = self.processor.abort(request_id)
        self.core.abort_requests([request_id])
        stream.put(final)

    @property
    def num_waiting_requests(self) -> int:
        """Waiting in the core at its latest step, plus sent since and not yet taken by it."""
        return self._stats.num_waiting + self._num_sent - self._num_received

    def stats(self) -> SchedulerStats:
        return self._stats

    # ---- the output handler -------------------------------------------------------------------
    async def _handle_outputs(self) -> None:
        # Every step that has already arrived is processed before the readers run: when this process is
        # behind the core, each stream then takes several tokens per wake-up and socket write, instead of
        # the process falling further behind one token at a time.
        nowait = getattr(self.core, "get_output_nowait", lambda: None)
        try:
            while True:
                self._process(await self.core.get_output())
                for _ in range(MAX_STEPS_PER_TURN):
                    outputs = nowait()
                    if outputs is None:
                        break
                    self._process(outputs)
        except asyncio.CancelledError:
            raise
        except EngineDeadError as exc:
            logger.error("the engine died: %s", exc)
            self._fail_all(exc)
        except Exception as exc:  # a bug here must not leave a request hanging
            logger.exception("processing the engine's output failed; ending every request")
            self._fail_all(EngineDeadError(f"processing the engine's output failed: {exc}"))

    def _process(self, outputs: EngineCoreOutputs) -> None:
        if outputs.stats is not None:
            self._stats, self._num_received = outputs.stats, outputs.num_requests_received
        deltas, stopped = self.processor.process(outputs)
        if stopped:
            self.core.abort_requests(stopped)
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is not None:
                stream.put(delta)
                if delta.finished:
                    del self._streams[delta.request_id]

    def _fail_all(self, exc: EngineDeadError) -> None:
        """End every open request with `exc`; from now on the client is not running."""
        self._dead = exc
        request_ids = list(self._streams)
        for request_id, stream in self._streams.items():
            self.processor.abort(request_id)
            stream.put(exc)
        self._streams.clear()
        if request_ids and self.core.is_alive:
            self.core.abort_requests(request_ids)


class OutputStream:
    """One request's deltas not yet read. While the reader is behind (a busy API process), new deltas merge
    into the pending one, so that one wake-up of the reader carries every token made since its last one."""

    __slots__ = ("pending", "error", "ready")

    def __init__(self):
        self.pending: RequestOutput | None = None
        self.error: BaseException | None = None  # raised once the pending delta was read
        self.ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self.error = item
        elif self.pending is None:
            self.pending = item
        else:
            self.pending = merge_outputs(self.pending, item)
        self.ready.set()

    async def get(self) -> RequestOutput:
        while self.pending is None and self.error is None:
            self.ready.clear()
            await self.ready.wait()
        if self.pending is None:
            raise self.error
        item, self.pending = self.pending, None
        return item


def merge_outputs(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """One delta equal to `first` followed by `then`: tokens and text joined, totals and ending from `then`."""
    logprobs = None
    if first.new_logprobs is not None or then.new_logprobs is not None:
        logprobs = (first.new_logprobs or []) + (then.new_logprobs or [])
    # the prompt's logprobs come once, with the first token: whichever delta holds them
    prompt_logprobs = first.prompt_logprobs if first.prompt_logprobs is not None else then.prompt_logprobs
    return RequestOutput(first.request_id, first.new_token_ids + then.new_token_ids, first.new_text + then.new_text,
                         then.finished, then.finish_reason, then.stop_reason, then.num_prompt_tokens,
                         then.num_output_tokens, then.num_cached_tokens, logprobs, prompt_logprobs)


def _stream_error(finish_reason: str, queue_timeout: float | None) -> Exception:
    if finish_reason == QUEUE_TIMEOUT:
        waited = f" {queue_timeout:g} s" if queue_timeout is not None else ""
        return QueueTimeoutError(f"the request waited{waited} in the queue without starting (the server is "
                                 f"overloaded); retry later")
    return RuntimeError("the engine could not finish this request (the server log says why)")
