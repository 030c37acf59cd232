"""The engine core in this process: a CoreClient that steps an EngineCore in an asyncio task.

For the offline API's asyncio twin, tests, debugging and one-process serving. Adds and aborts are
queued and applied between steps; a step runs on the event loop's own thread (on CPU, torch ran
2.3x slower from a worker thread on our 2-core machines; the loop is blocked for one step at most,
and handlers run between steps).
"""

from __future__ import annotations

import asyncio
import logging
import time

from llmserve.core.messages import AbortRequests, EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest
from llmserve.frontend.engine_client import EngineDeadError

logger = logging.getLogger(__name__)
MAX_DRAIN_STEPS = 4  # steps that collect work already launched on the device, after everything was aborted


class InprocCoreClient:
    """Runs `core` (an EngineCore) in a task of the caller's event loop; one client per core."""

    def __init__(self, core):
        self.core = core
        self.info = core.info
        self._pending: list[EngineCoreRequest | AbortRequests] = []  # in the order the client sent them
        self._request_ids: set[str] = set()  # added and not known to have ended: aborted at shutdown
        self._outputs: asyncio.Queue = asyncio.Queue()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._dead: EngineDeadError | None = None
        self._num_received = 0

    @classmethod
    def from_config(cls, config, progress=print) -> "InprocCoreClient":
        """Load the model of `config` into an EngineCore here (blocking)."""
        from llmserve.engine.engine_core import EngineCore

        return cls(EngineCore.from_config(config, progress=progress))

    async def start(self) -> None:
        assert self._task is None, "the core client is already started"
        self._emit(EngineCoreOutputs([], self.core.stats(), time.time()))  # /metrics has the pool from the start
        self._task = asyncio.create_task(self._run(), name="llmserve-engine-core")

    async def shutdown(self) -> None:
        """Stop stepping; every request still in the core is aborted, so its KV blocks are free."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        failed, self._dead = self._dead is not None, self._dead or EngineDeadError("the engine core was shut down")
        self._pending = [message for message in self._pending if isinstance(message, AbortRequests)]
        if not failed:  # a failed core already aborted what it could
            self._pending.append(AbortRequests(list(self._request_ids)))
            self._apply_pending()
            self._drain()
            if hasattr(self.core, "shutdown"):
                self.core.shutdown()  # a parallel engine's worker processes
    @property
    def is_alive(self) -> bool:
        return self._task is not None and not self._task.done() and self._dead is None

    def add_request(self, request: EngineCoreRequest) -> None:
        self._pending.append(request)
        self._wakeup.set()

    def abort_requests(self, request_ids: list[str]) -> None:
        self._pending.append(AbortRequests(list(request_ids)))
        self._wakeup.set()

    async def get_output(self) -> EngineCoreOutputs:
        if self._dead is not None and self._outputs.empty():
            raise self._dead
        item = await self._outputs.get()
        if isinstance(item, EngineDeadError):
            raise item
        return item

    def get_output_nowait(self) -> EngineCoreOutputs | None:
        try:
            item = self._outputs.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if isinstance(item, EngineDeadError):
            raise item
        return item

    # ---- the loop -----------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while True:
                applied = self._apply_pending()
                if not self.core.has_unfinished_requests():
                    if applied:  # the client's waiting count needs the core's view of these adds and aborts
                        self._emit(EngineCoreOutputs([], self.core.stats(), time.time()))
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                self._emit(self.core.step())
                await asyncio.sleep(0)  # let handlers run between steps
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a broken core must not leave any request hanging
            logger.exception("the engine core failed; ending every request")
            self._fail(exc)

    def _apply_pending(self) -> bool:
        """Hand the queued adds and aborts to the core, in order; whether there were any."""
        pending, self._pending = self._pending, []
        for message in pending:
            if isinstance(message, AbortRequests):
                self.core.abort_requests(message.request_ids)
                self._request_ids.difference_update(message.request_ids)
            else:
                self._add(message)
        return bool(pending)

    def _add(self, request: EngineCoreRequest) -> None:
        self._num_received += 1
        try:
            self.core.add_request(request)
        except ValueError as exc:  # the client checks first; this is a client that did not
            logger.error("the engine core refused request %s: %s", request.request_id, exc)
            self._emit(EngineCoreOutputs([EngineCoreOutput(request.request_id, [], finish_reason="abort")]))
            return
        self._request_ids.add(request.request_id)

    def _emit(self, outputs: EngineCoreOutputs) -> None:
        outputs.num_requests_received = self._num_received
        for output in outputs.outputs:
            if output.finish_reason is not None:
                self._request_ids.discard(output.request_id)
        self._outputs.put_nowait(outputs)

    def _fail(self, exc: Exception) -> None:
        self._dead = EngineDeadError(f"the engine core failed: {exc}")
        self._outputs.put_nowait(self._dead)
        try:  # free what can be freed; the core may be in any state
            self.core.abort_requests(list(self._request_ids))
        except Exception:  # noqa: BLE001
            logger.exception("aborting the requests of a failed core failed too")

    def _drain(self) -> None:
        """Collect a step still running on the device (async scheduling), so that no block stays in use."""
        try:
            for _ in range(MAX_DRAIN_STEPS):
                if not self.core.has_unfinished_requests():
                    return
                self.core.step()
        except Exception:  # noqa: BLE001 (shutting down: a failure here must not hide the original one)
            logger.exception("draining the engine core at shutdown failed")
