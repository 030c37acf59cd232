"""The step contract between the scheduler and the model runner: plain data keyed by request id.

Each step the scheduler sends one `SchedulerOutput` and the runner answers with one
`ModelRunnerOutput`. Both hold only ints, strings, lists, dicts and `SamplingParams`, so they
can be copied to other processes as they are (msgpack, or a torch.distributed broadcast to
the parallel workers) and the runner never sees a scheduler object. The runner keeps its own
per-request state (token ids, block table) and receives only what changed:

- a request it has never seen, or one coming back after preemption, arrives whole in
  `new_requests` (prompt, outputs known so far, params, all its block ids);
- a request it already holds arrives in `cached_requests` with its newly appended block ids;
- ids in `finished_request_ids` or `preempted_request_ids` drop the runner's state.
"""

from __future__ import annotations

import msgspec

from llmserve.core.messages import PromptLogprobs, TokenLogprobs
from llmserve.sampling_params import SamplingParams


class NewRequestData(msgspec.Struct, array_like=True):
    """Everything the runner needs of a request it does not hold yet."""

    request_id: str
    prompt_token_ids: list[int]
    # outputs known so far: empty for a fresh request, its outputs when a preempted one resumes
    output_token_ids: list[int]
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # tokens already in the KV cache (a prefix-cache hit)


class CachedRequestData(msgspec.Struct, array_like=True):
    """What changed for requests the runner already holds, as parallel lists in schedule order.

    No resumed flag: a preempted request loses its runner state and comes back in
    `new_requests`, so a cached request's block ids only ever grow.
    """

    request_ids: list[str] = []
    new_block_ids: list[list[int]] = []  # appended to the request's block table
    num_computed_tokens: list[int] = []  # where this step's tokens start


class SchedulerOutput(msgspec.Struct, array_like=True):
    """One step: which requests run, how many tokens each, and what the runner must forget."""

    new_requests: list[NewRequestData] = []
    cached_requests: CachedRequestData = msgspec.field(default_factory=CachedRequestData)
    # request id -> tokens computed this step, in schedule order (the runner's batch order
    # follows it, decodes first)
    num_scheduled_tokens: dict[str, int] = {}
    # requests whose last token is computed this step, so a token is sampled for them
    sampling_request_ids: set[str] = set()
    finished_request_ids: list[str] = []  # ended since the previous schedule
    preempted_request_ids: list[str] = []  # their blocks were freed this step

    @property
    def is_empty(self) -> bool:
        """Nothing to run (there may still be ids for the runner to forget)."""
        return not self.num_scheduled_tokens


class GrammarBitmask(msgspec.Struct, array_like=True):
    """The tokens the constrained requests of a step may sample: per request one row of ceil(V / 32)
    little-endian int32 words, bit t of the row set when token t is allowed. Requests not named are
    unconstrained. Computed by the engine core's grammar matchers, applied by the runner's sampler."""

    request_ids: list[str]
    words: bytes  # len(request_ids) rows, back to back (in process: any flat bytes-like object)


class ModelRunnerOutput(msgspec.Struct, array_like=True):
    """One sampled token per request that sampled this step, in the runner's batch order."""

    request_ids: list[str] = []
    sampled_token_ids: list[int] = []
    # one entry per row when any request of the step asked for logprobs; None for rows that did not
    logprobs: list[TokenLogprobs | None] | None = None
    prompt_logprobs: list[PromptLogprobs] = []  # the prompt positions this step scored, per request asking


def single_prefill(request_id: str, token_ids: list[int], params: SamplingParams,
                   block_ids: list[int]) -> SchedulerOutput:
    """A step that prefills one new request whole (warm-ups and white-box tests)."""
    new = NewRequestData(request_id, list(token_ids), [], params, list(block_ids), 0)
    return SchedulerOutput(new_requests=[new], num_scheduled_tokens={request_id: len(token_ids)},
                           sampling_request_ids={request_id})
