"""The scheduler's view of one request: its tokens, how many are computed, its block table.

Plain Python, core side only: the runner never sees a Sequence (it keeps its own state,
keyed by request id, from the plain-data SchedulerOutput).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from llmserve.sampling_params import SamplingParams


# An output slot whose token the device is still sampling (async scheduling); always at the tail.
PLACEHOLDER = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # client went away or the server shut down


@dataclass(slots=True, eq=False)
class Sequence:
    """Prompt plus generated tokens; `num_computed_tokens` chases `num_tokens`."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_step: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    max_output_tokens: int = 0  # max_tokens capped by the context length
    # prompt tokens 1.. scored so far (params.prompt_logprobs); False once sent with the first output
    prompt_logprobs: list | bool | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens known on the host: trailing placeholders are not counted."""
        n = len(self.output_token_ids)
        while n and self.output_token_ids[n - 1] == PLACEHOLDER:
            n -= 1
        return n

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids
