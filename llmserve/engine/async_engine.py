"""asyncio front of the engine: `generate()` yields deltas, `abort()` ends a request.

The engine itself is single-threaded: adds and aborts are queued by the event loop and
applied by the loop task between steps. A step runs on the loop's thread (or, with
`step_in_thread`, in one worker thread, keeping the loop responsive during a step).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from llmserve.engine.engine import Engine, RequestOutput
from llmserve.core.sequence import SequenceStatus
from llmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop is not running; the request cannot be served."""


class QueueTimeoutError(RuntimeError):
    """The request waited in the queue past the queue timeout without starting; it was removed."""


class AsyncEngine:
    """Runs `Engine.step()` in a background task; many concurrent `generate()` callers.

    With `queue_timeout` (seconds), a request not yet scheduled that long after it arrived is
    ended: its `generate()` raises QueueTimeoutError. Requests already started are never timed out.
    """

    def __init__(self, engine: Engine, step_in_thread: bool = False, queue_timeout: float | None = None):
        assert queue_timeout is None or queue_timeout > 0, f"queue_timeout must be > 0 or None, got {queue_timeout}"
        self.engine = engine
        self.queue_timeout = queue_timeout
        # By default a step runs on the event loop's own thread: on CPU, torch kernels ran
        # 2.3x slower from a worker thread on our 2-core machines; the loop is blocked for
        # one step at most (tens of ms on GPU), and handlers run between steps.
        self.step_in_thread = step_in_thread
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending_adds: list[tuple[str, list[int], SamplingParams]] = []
        self._pending_aborts: list[str] = []
        # request id -> monotonic start deadline; insertion order is arrival order, so deadlines ascend
        self._start_deadlines: dict[str, float] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmserve-step")
        self.num_steps = 0
        # waiting slots the server took at admission for requests not yet passed to generate()
        # (server/generation.py's Reservation), so that a burst cannot overshoot its queue limit
        self.num_reserved = 0

    # ---- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        assert self._task is None, "engine loop already started"
        self._task = asyncio.create_task(self._run_loop(), name="llmserve-engine-loop")

    async def stop(self) -> None:
        """Abort everything still running, end the loop, and release the worker thread."""
        for request_id in list(self._queues):
            self.abort(request_id)
        if self._task is not None:
            self._wakeup.set()
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._apply_pending()
        self._executor.shutdown(wait=True)

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def num_waiting_requests(self) -> int:
        """Requests accepted but not running: reserved, queued for the loop, or in the scheduler's waiting
        queue (not yet started, or preempted and waiting to resume)."""
        return self.num_reserved + len(self._pending_adds) + len(self.engine.scheduler.waiting)

    @property
    def num_running_requests(self) -> int:
        return len(self.engine.scheduler.running)

    # ---- requests ---------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Yield the request's deltas until it finishes; closing the iterator aborts it."""
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running")
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.engine.check_request(prompt_token_ids, params)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        self._pending_adds.append((request_id, prompt_token_ids, params))
        if self.queue_timeout is not None:
            self._start_deadlines[request_id] = time.monotonic() + self.queue_timeout
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._start_deadlines.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Ask for the request to end; its blocks are freed before the next step."""
        queue = self._queues.pop(request_id, None)
        if queue is None:
            return
        self._pending_aborts.append(request_id)
        self._wakeup.set()
        queue.put_nowait(RequestOutput(request_id, [], "", finished=True, finish_reason="abort"))

    # ---- the loop -------------------------------------------------------------------
    async def _run_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._apply_pending()
            self._expire_unstarted()
            if not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                if self.step_in_thread:
                    outputs = await loop.run_in_executor(self._executor, self.engine.step)
                else:
                    outputs = self.engine.step()
            except Exception as exc:  # a broken step must not hang every client
                logger.exception("engine step failed; failing all running requests")
                self._fail_all(exc)
                continue
            self.num_steps += 1
            for output in outputs:
                queue = self._queues.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)
                    if output.finished:
                        del self._queues[output.request_id]
            await asyncio.sleep(0)  # let handlers run between steps

    def _apply_pending(self) -> None:
        aborts, self._pending_aborts = self._pending_aborts, []
        for request_id in aborts:
            self.engine.abort_request(request_id)
        adds, self._pending_adds = self._pending_adds, []
        for request_id, prompt, params in adds:
            if request_id not in self._queues:
                continue  # aborted before it was ever added
            try:
                self.engine.add_request(request_id, prompt, params)
            except Exception as exc:
                self._queues.pop(request_id).put_nowait(exc)

    def _expire_unstarted(self) -> None:
        """End the requests past their start deadline that were never scheduled (they hold no KV blocks)."""
        now = time.monotonic()
        while self._start_deadlines:
            request_id, deadline = next(iter(self._start_deadlines.items()))
            if deadline > now:
                return
            del self._start_deadlines[request_id]
            if self._never_scheduled(request_id):
                self.engine.abort_request(request_id)
                self._queues.pop(request_id).put_nowait(QueueTimeoutError(
                    f"the request waited {self.queue_timeout:g} s in the queue without starting "
                    f"(the server is overloaded); retry later"))

    def _never_scheduled(self, request_id: str) -> bool:
        seq = self.engine.core.requests.get(request_id)
        if seq is None or request_id not in self._queues:
            return False
        return seq.status is SequenceStatus.WAITING and seq.num_computed_tokens == 0 and seq.num_preemptions == 0

    def _fail_all(self, exc: Exception) -> None:
        for request_id, queue in list(self._queues.items()):
            self.engine.abort_request(request_id)
            queue.put_nowait(RuntimeError(f"engine step failed: {exc}"))
        self._queues.clear()
