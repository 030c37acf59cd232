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
    return token_samples(exchange_texts(conversations, held_out=True), tokenizer, num_texts, max_len)


def exchange_texts(conversations: list[dict], held_out: bool):
    """Each first exchange as "prompt\n\nreply", of the held-out records or of the others (calibration's)."""
    return ("\n\n".join(exchange) for exchange in _exchanges(conversations, held_out))


def token_samples(texts, tokenizer, count: int, max_len: int) -> list[list[int]]:
    """Token ids of the first `count` of `texts` with at least MIN_TOKENS tokens, each cut to `max_len`."""
    samples = (tokenizer.encode(text)[:max_len] for text in texts)
    return _first(samples, count, lambda ids: len(ids) >= MIN_TOKENS)


def _exchanges(conversations: list[dict], held_out: bool):
    for record in conversations:
        exchange = first_exchange(record) if is_heldout(record) == held_out else None
        if exchange is not None:
            yield exchange


def _first(items, count: int, keep) -> list:
    """The first `count` of `items` that `keep` accepts (consumes no more than needed)."""
    kept = []
    for item in items:
        if keep(item):
            kept.append(item)
            if len(kept) == count:
                break
    return kept


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


def heldout_prompts(conversations: list[dict], tokenizer, num_prompts: int, max_len: int) -> list[list[int]]:
    """Token ids of the first `num_prompts` held-out first human turns, as chat prompts (cut to max_len)."""
    def chat_prompt(exchange: tuple[str, str]) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": exchange[0]}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    prompts = (chat_prompt(exchange) for exchange in _exchanges(conversations, held_out=True))
    return _first(prompts, num_prompts, lambda ids: MIN_TOKENS <= len(ids) <= max_len)


def first_divergence(llm, reference, prompts: list[list[int]], max_tokens: int) -> dict:
    """Greedy continuations of both models, token by token: where they first differ (max_tokens when they
    never do), and the fraction of prompts whose continuations are identical."""
    if not prompts:
        raise ValueError("no held-out prompt to compare the models on")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ours = [r.outputs[0].token_ids for r in llm.generate(prompts, params)]
    theirs = [r.outputs[0].token_ids for r in reference.generate(prompts, params)]
    positions = sorted(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), max_tokens)
                       for x, y in zip(ours, theirs))
    return {"prompts": len(prompts), "max_tokens": max_tokens,
            "identical": sum(p == max_tokens for p in positions) / len(positions),
            "median_first_divergence": positions[len(positions) // 2],
            "mean_first_divergence": sum(positions) / len(positions)}
