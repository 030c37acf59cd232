"""Perplexity of held-out text, computed by the engine itself: each text is one prompt scored in its
prefill (prompt logprobs), so the figure measures this runtime's numerics (dtype, quantization,
kernels), not a reference implementation's.

Texts: ShareGPT's held-out conversations (every record whose id hashes to 0 mod 10; calibration
uses the others), each its first exchange joined as "prompt\\n\\nreply", cut to `max_len` tokens.
"""

from __future__ import annotations

import math
import zlib

from llmserve.bench.sharegpt import first_exchange
from llmserve.sampling_params import SamplingParams

HELDOUT_EVERY = 10
MIN_TOKENS = 16  # shorter texts say little and weigh little


def is_heldout(record: dict) -> bool:
    """The held-out tenth of ShareGPT, by a stable hash of the record id (never calibrated on)."""
    return zlib.crc32(str(record.get("id", "")).encode()) % HELDOUT_EVERY == 0


def heldout_texts(conversations: list[dict], tokenizer, num_texts: int, max_len: int) -> list[list[int]]:
    """Token ids of the first `num_texts` held-out exchanges of at least MIN_TOKENS tokens, cut to max_len."""
    texts = []
    for record in conversations:
        exchange = first_exchange(record) if is_heldout(record) else None
        if exchange is None:
            continue
        ids = tokenizer.encode("\n\n".join(exchange))[:max_len]
        if len(ids) >= MIN_TOKENS:
            texts.append(ids)
        if len(texts) == num_texts:
            break
    return texts


def perplexity(llm, texts: list[list[int]]) -> dict:
    """exp(mean negative log-likelihood) over every token but each text's first, and the counts."""
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    nll = num_tokens = 0
    for result in llm.generate(texts, params):
        scored = result.prompt_logprobs[1:]  # the first token has nothing before it
        nll -= sum(token.logprob for token in scored)
        num_tokens += len(scored)
    return {"perplexity": math.exp(nll / num_tokens), "nll_per_token": nll / num_tokens,
            "num_tokens": num_tokens, "num_texts": len(texts)}
