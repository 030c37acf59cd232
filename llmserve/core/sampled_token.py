"""One sampled token and its log-probabilities: plain data, shared by the model runner and the API side.

It lives here rather than in the worker so that the API process (output processor, server, offline API)
never imports the torch side just for this record.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SampledToken:
    """One sampled token with its log-probabilities when the request asked for them."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    rank: int | None = None  # 1 + how many tokens were likelier (prompt tokens)
