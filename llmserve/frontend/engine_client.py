"""The one interface the API server (routes, admission, /metrics, the banner) uses to reach an engine.

Implemented by the in-process client (tests, debugging, the offline API's asyncio twin), the
multi-process client (the engine core in its own process, over ZeroMQ) and the TensorRT-LLM
adapter. Nothing behind it is reached directly: no `engine.engine.*`, no live sequences.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from llmserve.core.messages import ModelInfo, SchedulerStats
from llmserve.core.sampled_token import SampledToken
from llmserve.sampling_params import SamplingParams


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request, as text and tokens: a delta, plus totals so far."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    new_logprobs: list[SampledToken] | None = None  # one per new token, when asked
    # prompt tokens 1.. with their log-probabilities (SamplingParams.prompt_logprobs), with the first token
    prompt_logprobs: list[SampledToken] | None = None


class EngineDeadError(RuntimeError):
    """The engine is not running (stopped, or its process died); the request cannot be served."""


class QueueTimeoutError(RuntimeError):
    """The request waited past its queue timeout without being scheduled; the core removed it."""


class EngineClient(Protocol):
    """An engine that serves many concurrent requests to one event loop."""

    tokenizer: object | None  # the HF tokenizer of the model (None: token ids only)
    info: ModelInfo

    async def start(self) -> None:
        """Start serving (load or connect); returns once requests can be accepted."""

    async def stop(self) -> None:
        """Abort everything still running (each ends with finish_reason 'abort') and release the engine."""

    @property
    def is_running(self) -> bool:
        """False before start, after stop, and once the engine has died."""

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError when the request can never run (empty prompt, ids out of range, too long)."""

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                 queue_timeout: float | None = None) -> AsyncIterator[RequestOutput]:
        """Deltas of one request until it finishes; closing the iterator early aborts it.

        Raises EngineDeadError (at once or mid-stream) when the engine is not running or dies, and
        QueueTimeoutError when the request was not scheduled within `queue_timeout` seconds.
        """

    def abort(self, request_id: str) -> None:
        """End the request now; its iterator yields a final 'abort' delta and its KV blocks are freed."""

    @property
    def num_waiting_requests(self) -> int:
        """Requests accepted but not running yet (the admission check bounds this)."""

    def stats(self) -> SchedulerStats:
        """The latest queue, KV pool and token counters (for /metrics)."""
