"""Running one HTTP request's choices in the engine: admission, fan-out of n, abort on exit."""

from __future__ import annotations

import asyncio

from llmserve.engine.async_engine import AsyncEngine, EngineDeadError
from llmserve.engine.engine import RequestOutput
from llmserve.sampling_params import SamplingParams
from llmserve.server.config import ServerConfig
from llmserve.server.errors import APIError, bad_request
from llmserve.server.protocol import GenerationRequest


def admit(engine: AsyncEngine, config: ServerConfig, gen: GenerationRequest, prompt_param: str) -> None:
    """Raise the APIError a request gets before it reaches the engine (lengths, queue); the model
    was already chosen by the registry."""
    for prompt in gen.prompts:
        _check_length(engine, prompt, gen.params, prompt_param)
    if not engine.is_running:
        raise APIError(503, "the engine is not running", code="engine_not_ready")
    num_waiting, num_new = engine.num_waiting_requests, len(gen.prompts) * gen.params.n
    if num_waiting + num_new > config.max_waiting:
        raise APIError(429, f"the server is busy ({num_waiting} requests waiting); retry later",
                       code="too_many_requests", headers={"Retry-After": str(config.retry_after_s)})


def _check_length(engine: AsyncEngine, prompt: list[int], params: SamplingParams, prompt_param: str) -> None:
    max_model_len = engine.engine.max_model_len
    try:
        engine.engine.check_request(prompt, params)
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

    def __init__(self, engine: AsyncEngine, request_id: str, prompts: list[list[int]], params: SamplingParams):
        self.engine = engine
        self.request_ids = [f"{request_id}-{i}" for i in range(len(prompts) * params.n)]
        self._jobs = [(prompt, params.for_choice(i)) for prompt in prompts for i in range(params.n)]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._num_unfinished = len(self.request_ids)

    async def __aenter__(self) -> "ChoiceRun":
        self._pumps = [asyncio.create_task(self._pump(i, rid, prompt, params))
                       for i, (rid, (prompt, params)) in enumerate(zip(self.request_ids, self._jobs))]
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.abort()
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

    async def _pump(self, index: int, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        try:
            async for output in self.engine.generate(request_id, prompt, params):
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
