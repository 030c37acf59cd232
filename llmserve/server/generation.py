"""Running one HTTP request's choices in the engine: admission, fan-out of n, abort on exit.

"Waiting" means accepted but not running: admitted by the server and not yet passed to the
engine, on its way to the engine core, or in the scheduler's waiting queue (not yet started, or
preempted and waiting to resume). `max_waiting` bounds that count; admission reserves a
request's slots synchronously, so handlers racing through admission all see each other.
"""

from __future__ import annotations

import asyncio

from llmserve.frontend.engine_client import EngineClient, EngineDeadError, RequestOutput
from llmserve.sampling_params import SamplingParams
from llmserve.server.config import ServerConfig
from llmserve.server.errors import APIError, bad_request
from llmserve.server.models import ServedModel
from llmserve.server.protocol import GenerationRequest


def admit(model: ServedModel, config: ServerConfig, gen: GenerationRequest, prompt_param: str) -> "Reservation":
    """Check what a request gets before it reaches the engine (lengths, queue room) and take its waiting
    slots at once, with no await in between, so that a burst cannot overshoot `max_waiting`; the model was
    already chosen by the registry."""
    engine = model.engine
    for prompt in gen.prompts:
        _check_length(engine, prompt, gen.params, prompt_param)
    num_new = len(gen.prompts) * gen.params.n
    if num_new > config.max_waiting:  # could never be admitted, however idle the server: not worth a retry
        raise bad_request(f"this request asks for {num_new} completions (n={gen.params.n} for each of "
                          f"{len(gen.prompts)} prompts), but the server queues at most {config.max_waiting} "
                          f"(--max-waiting); lower n or send fewer prompts per request", "n", "too_many_choices")
    if not engine.is_running:
        raise APIError(503, "the engine is not running", code="engine_not_ready")
    num_waiting = model.num_waiting
    if num_waiting + num_new > config.max_waiting:
        raise APIError(429, f"the server is busy ({num_waiting} requests waiting); retry later",
                       code="too_many_requests", headers={"Retry-After": str(config.retry_after_s)})
    return Reservation(model, num_new)


class Reservation:
    """Waiting slots taken at admission for choices not yet handed to the engine.

    Each slot is given back exactly once: when its choice is sent to the engine, which counts it
    as waiting from then on (`hand_over`, right before `generate()` sends it, with no await in
    between), or when the run ends before that for any reason (`release_all`).
    """

    def __init__(self, model: ServedModel, num_slots: int):
        self.model = model
        self.num_slots = num_slots
        model.num_reserved += num_slots

    def hand_over(self) -> None:
        """One choice is about to be sent to the engine, which counts it as waiting from then on."""
        if self.num_slots:
            self.num_slots -= 1
            self.model.num_reserved -= 1

    def release_all(self) -> None:
        """Give back the slots of the choices never handed over (the run ended first)."""
        self.model.num_reserved -= self.num_slots
        self.num_slots = 0


def _check_length(engine: EngineClient, prompt: list[int], params: SamplingParams, prompt_param: str) -> None:
    max_model_len = engine.info.max_model_len
    try:
        engine.check_request(prompt, params)
    except ValueError as exc:
        code = "context_length_exceeded" if len(prompt) >= max_model_len else None
        raise bad_request(str(exc), prompt_param, code) from exc
    # vLLM's rule: a prompt plus max_tokens beyond the context is refused, not silently capped
    if params.max_tokens is not None and len(prompt) + params.max_tokens > max_model_len:
        raise bad_request(
            f"this model's context length is {max_model_len} tokens, but {len(prompt) + params.max_tokens} "
            f"were requested ({len(prompt)} prompt tokens plus max_tokens {params.max_tokens}); shorten the "
            f"prompt or lower max_tokens", "max_tokens", "context_length_exceeded")


class ChoiceRun:
    """All choices of one request (prompts x n) in the engine; iterate for (index, delta).

    Use as `async with`: leaving the block for any reason (done, error, client gone,
    cancellation) aborts every choice still running, so its KV blocks are freed.
    """

    def __init__(self, engine: EngineClient, request_id: str, prompts: list[list[int]], params: SamplingParams,
                 reservation: Reservation, queue_timeout: float | None = None):
        self.engine = engine
        self.reservation = reservation
        self.queue_timeout = queue_timeout
        self.request_ids = [f"{request_id}-{i}" for i in range(len(prompts) * params.n)]
        self._jobs = [(prompt, params.for_choice(i)) for prompt in prompts for i in range(params.n)]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._num_unfinished = len(self.request_ids)
        # One choice (the common case) is read straight from the engine: no pump task, one wake-up per delta
        self._single = None

    async def __aenter__(self) -> "ChoiceRun":
        if len(self._jobs) == 1:
            (prompt, params), = self._jobs
            self._single = self.engine.generate(self.request_ids[0], prompt, params, queue_timeout=self.queue_timeout)
            return self
        self._pumps = [asyncio.create_task(self._pump(i, rid, prompt, params))
                       for i, (rid, (prompt, params)) in enumerate(zip(self.request_ids, self._jobs))]
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.reservation.release_all()  # the choices whose pump never started
        self.abort()
        if self._single is not None:
            await self._single.aclose()
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    def abort(self) -> None:
        """End every choice now; each one still iterated yields a final 'abort' delta."""
        for request_id in self.request_ids:
            self.engine.abort(request_id)

    @property
    def num_unfinished(self) -> int:
        """Choices whose final delta has not been read (aborted if the run ends now)."""
        return self._num_unfinished

    def __aiter__(self) -> "ChoiceRun":
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if self._num_unfinished == 0:
            raise StopAsyncIteration
        if self._single is not None:
            index, item = 0, await self._next_single()
        else:
            index, item = await self._queue.get()
        if isinstance(item, EngineDeadError):
            raise APIError(503, str(item), code="engine_not_ready") from item
        if isinstance(item, ValueError):  # the engine refused the request after all
            raise bad_request(str(item)) from item
        if isinstance(item, BaseException):
            raise item
        if item.finished:
            self._num_unfinished -= 1
        return index, item

    async def _next_single(self) -> RequestOutput | BaseException:
        if self.reservation.num_slots:
            self.reservation.hand_over()  # the first step of generate() sends the request, before any await
        try:
            return await self._single.__anext__()
        except StopAsyncIteration:  # generate() ends after the final delta, which was counted already
            raise RuntimeError("the engine ended a request without a final delta") from None
        except Exception as exc:  # the same handling as a pump's
            return exc

    async def _pump(self, index: int, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        self.reservation.hand_over()  # generate() sends the choice before its first await
        try:
            async for output in self.engine.generate(request_id, prompt, params, queue_timeout=self.queue_timeout):
                self._queue.put_nowait((index, output))
        except Exception as exc:  # handed to the reader, which turns it into an error response
            self._queue.put_nowait((index, exc))


class InflightRuns:
    """The ChoiceRuns in progress, so that shutdown can wait for them and then abort them."""

    def __init__(self):
        self._runs: set[ChoiceRun] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._runs)

    def add(self, run: ChoiceRun) -> None:
        self._runs.add(run)
        self._idle.clear()

    def discard(self, run: ChoiceRun) -> None:
        self._runs.discard(run)
        if not self._runs:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True when every run ended within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def abort_all(self) -> None:
        for run in list(self._runs):
            run.abort()
