"""What crosses between the API side and the engine core: plain data, msgpack-encodable.

The same structs serve the in-process engine (passed as objects) and the engine-core
process (encoded with msgspec's msgpack over ZeroMQ), so both paths carry exactly the same
information: request ids, token ids, sampling parameters, per-step token deltas, counters.
No text crosses: detokenization and stop strings live with the client (frontend).
"""

from __future__ import annotations

import msgspec

from llmserve.sampling_params import SamplingParams


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, tag="add"):
    """A request for the core: its prompt as token ids and how to sample it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    # seconds it may wait before it is first scheduled; past that, never started, it ends "queue_timeout"
    queue_timeout: float | None = None


class AbortRequests(msgspec.Struct, array_like=True, tag="abort"):
    """End these requests now (client gone, stop string seen, shutdown); unknown ids are ignored."""

    request_ids: list[str]


class TokenLogprobs(msgspec.Struct, array_like=True):
    """The log-probability of one sampled token and the top alternatives (token id, logprob)."""

    logprob: float
    top: list[tuple[int, float]] = []
    rank: int | None = None  # 1 + how many tokens the model found likelier (computed for prompt tokens)


class PromptLogprobs(msgspec.Struct, array_like=True):
    """Log-probabilities of prompt tokens first_position, first_position + 1, ... of one request."""

    request_id: str
    first_position: int
    entries: list[TokenLogprobs]


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """One request's progress in one step: new token ids, and how it ended if it did."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None  # one per new token, when the request asked
    finish_reason: str | None = None  # "stop" (EOS or a stop token id), "length", "abort" or "queue_timeout"
    stop_reason: int | None = None  # the stop token id that ended it
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # with the request's first token, when it asked: prompt tokens 1.. (the first has no logprob)
    prompt_logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, array_like=True):
    """The core's queues, KV pool and totals after a step (what /metrics shows)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_cached: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_prompt_tokens_total: int = 0
    num_generation_tokens_total: int = 0
    num_preemptions_total: int = 0
    num_steps: int = 0


class EngineCoreOutputs(msgspec.Struct, array_like=True):
    """Everything one engine step produced, for every request: one message per step."""

    outputs: list[EngineCoreOutput]
    stats: SchedulerStats | None = None
    timestamp: float = 0.0
    # this client's EngineCoreRequests the core has taken so far (`stats` counts them): the client's
    # requests still on their way are the ones it sent beyond this (exact admission counts)
    num_requests_received: int = 0


class ModelInfo(msgspec.Struct, array_like=True):
    """What the API side needs to know of a loaded engine (limits, banner, model card)."""

    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    device: str
    dtype: str
    quantization: str | None
    kv_cache_dtype: str
    num_kv_blocks: int
    block_size: int
    max_num_seqs: int
    tokenizer_path: str | None  # where the API side loads the same tokenizer from


# Client -> core messages; the tag tells them apart on the wire.
CoreRequest = EngineCoreRequest | AbortRequests
