"""A model's own sampling defaults, from its `generation_config.json`, for the fields a request omits.

vLLM applies them unless told not to (`--generation-config`); a model whose authors tuned it to sample
at, say, temperature 0.6 answers far better with that than with the API's default of 1.0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from llmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
# generation_config.json name -> SamplingParams name
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(model_dir: str | Path | None) -> dict:
    """The sampling fields `model_dir/generation_config.json` sets (SamplingParams names); {} when it has
    none, or when they are not valid sampling values (then with a warning)."""
    path = Path(model_dir) / "generation_config.json" if model_dir else None
    if path is None or not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        defaults = {ours: raw[theirs] for theirs, ours in FIELDS.items() if raw.get(theirs) is not None}
        SamplingParams(**defaults)  # validates the values
    except (ValueError, TypeError) as exc:
        logger.warning("ignoring the sampling defaults of %s: %s", path, exc)
        return {}
    return defaults
