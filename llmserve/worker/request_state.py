"""The runner's own per-request state, keyed by request id, kept in step with each SchedulerOutput.

The runner holds a request from the step it arrives in `new_requests` until the scheduler
reports it finished or preempted; in between it learns only what changed (new block ids,
where the step's tokens start). Its output ids include the tokens the runner itself sampled:
a sample still on the device is a PLACEHOLDER until its step is collected, and the next
step's decode input for it is copied on the device from that step's samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmserve.core.scheduler_output import NewRequestData, SchedulerOutput
from llmserve.core.sequence import PLACEHOLDER
from llmserve.sampling_params import SamplingParams
from llmserve.worker.block_tables import BlockTableRows


@dataclass(slots=True, eq=False)
class RequestState:
    """One request as the runner sees it; also what the sampler reads (a SamplingRow)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # PLACEHOLDER for samples still on the device (always at the tail)
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # where the current step's tokens start
    last_sample_row: int = -1  # row of its newest sample in the step that drew it

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def token_slice(self, start: int, end: int) -> list[int]:
        """Token ids [start, end), all of them known on the host (a prefill chunk)."""
        tokens = (self.prompt_token_ids + self.output_token_ids)[start:end]
        assert PLACEHOLDER not in tokens, f"{self.request_id}: a prefill chunk reaches a token still in flight"
        return tokens

    def slot(self, position: int, block_size: int) -> int:
        """Index of `position`'s KV entry in the flat [num_blocks * block_size] cache."""
        return self.block_ids[position // block_size] * block_size + position % block_size


class RequestStates:
    """Every request the runner holds, by id, with their block-table rows."""

    def __init__(self, num_rows: int = 64):
        self.states: dict[str, RequestState] = {}
        self.block_rows = BlockTableRows(num_rows=num_rows)

    def __len__(self) -> int:
        return len(self.states)

    def update(self, out: SchedulerOutput) -> None:
        """Forget finished and preempted requests, take on new ones, grow the cached ones."""
        for request_id in out.finished_request_ids:
            self.remove(request_id)
        for request_id in out.preempted_request_ids:
            self.remove(request_id)
        for new in out.new_requests:
            self._add(new)
        cached = out.cached_requests
        for request_id, new_block_ids, num_computed in zip(
                cached.request_ids, cached.new_block_ids, cached.num_computed_tokens):
            state = self.states[request_id]
            state.num_computed_tokens = num_computed
            if new_block_ids:
                state.block_ids.extend(new_block_ids)
                self.block_rows.extend(request_id, new_block_ids)

    def remove(self, request_id: str) -> None:
        """Drop a request's state and row; unknown ids (never scheduled, already dropped) are ignored."""
        if self.states.pop(request_id, None) is not None:
            self.block_rows.remove(request_id)

    def _add(self, new: NewRequestData) -> None:
        assert new.request_id not in self.states, f"request {new.request_id} is already held by the runner"
        self.states[new.request_id] = RequestState(
            new.request_id, new.prompt_token_ids, list(new.output_token_ids), new.params, list(new.block_ids),
            new.num_computed_tokens)
        self.block_rows.add(new.request_id, new.block_ids)
