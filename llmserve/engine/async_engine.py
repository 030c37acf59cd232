"""asyncio front of the engine: `generate()` yields deltas, `abort()` ends a request.

The engine itself is single-threaded: adds and aborts are queued by the event loop and
applied by the loop task between steps. A step runs on the loop's thread (or, with
`step_in_thread`, in one worker thread, keeping the loop responsive during a step).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from llmserve.engine.engine import Engine, RequestOutput
from llmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop is not running; the request cannot be served."""


class AsyncEngine:
    """Runs `Engine.step()` in a background task; many concurrent `generate()` callers."""

    def __init__(self, engine: Engine, step_in_thread: bool = False):
        self.engine = engine
        # By default a step runs on the event loop's own thread: on CPU, torch kernels ran
        # 2.3x slower from a worker thread on our 2-core machines; the loop is blocked for
        # one step at most (tens of ms on GPU), and handlers run between steps.
        self.step_in_thread = step_in_thread
        self._queues: dict[str, asyncio.Queue] = {}
        self._pending_adds: list[tuple[str, list[int], SamplingParams]] = []
        self._pending_aborts: list[str] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmserve-step")
        self.num_steps = 0

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
        return len(self.engine.scheduler.waiting) + len(self._pending_adds)

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

    def _fail_all(self, exc: Exception) -> None:
        for request_id, queue in list(self._queues.items()):
            self.engine.abort_request(request_id)
            queue.put_nowait(RuntimeError(f"engine step failed: {exc}"))
        self._queues.clear()
