"""Benchmark prompt sets: random (workloads T/S), workload C chat prompts, multi-turn chat, jsonl."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

# Plain words for prompts when no tokenizer is at hand (one word per wanted token).
_WORDS = ("time year people way day man thing woman life child world school state family student group "
          "country problem hand part place case week company system program question work government number "
          "night point home water room mother area money story fact month lot right study book eye job word "
          "business issue side kind head house service friend father power hour game line end member law car "
          "city community name president team minute idea kid body information back parent face others level "
          "office door health person art war history party result change morning reason research girl guy "
          "moment air teacher force education").split()


@dataclass(slots=True)
class BenchRequest:
    """One request to send: text, token ids or chat messages, and its output budget."""

    prompt: str | list[int] | list[dict]
    max_tokens: int
    prompt_len: int | None = None


def random_dataset(num_prompts: int, input_len_range: tuple[int, int] = (256, 1024), output_len: int = 256,
                   seed: int = 0, tokenizer=None, endpoint: str = "completions") -> list[BenchRequest]:
    """Workloads T/S: uniform lengths then uniform ids in [100, 30000), all from one seeded generator."""
    lo, hi = input_len_range
    assert 0 < lo <= hi, f"bad input length range {input_len_range}"
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi, size=num_prompts, endpoint=True)
    items = []
    for length in lengths:
        ids = rng.integers(100, 30000, size=int(length)).tolist()
        items.append(BenchRequest(_ids_to_prompt(ids, tokenizer, endpoint), output_len, int(length)))
    return items


def _ids_to_prompt(ids: list[int], tokenizer, endpoint: str) -> str | list[int]:
    """Token ids as the endpoint wants them: ids for completions, text for chat."""
    if endpoint == "completions":
        return ids
    if tokenizer is not None:
        return tokenizer.decode(ids)
    # No tokenizer: one plain word per id, so the length is only roughly right in tokens.
    return " ".join(_WORDS[i % len(_WORDS)] for i in ids)


_TOPICS = ["sourdough bread", "a small vegetable garden", "learning the piano as an adult", "training for a 10k run",
           "moving to a new city", "a home network with two routers", "writing a cover letter",
           "saving for retirement", "a road trip through the Alps", "caring for a senior dog",
           "learning Spanish", "a Python web scraper", "repainting a bedroom", "starting a book club",
           "reducing screen time", "brewing better coffee"]
_QUESTIONS = ["What should I do first, and why?", "Can you give me a step by step plan for the next month?",
              "What are the most common mistakes people make, and how do I avoid them?",
              "Can you summarise the trade-offs in a short list?"]
_CONTEXT = ["I have tried a few things already but the results were mixed.",
            "A friend gave me some advice, though I am not sure it applies to my situation.",
            "My budget is limited, so cheap options matter more than perfect ones.",
            "I can spend about an hour on weekdays and more time on weekends.",
            "I read several articles online and they seemed to contradict each other.",
            "Last year I started once and gave up after a couple of weeks.",
            "I would like to understand the reasons behind each step, not just the steps.",
            "My family is supportive but they do not know much about it either.",
            "I keep notes of what I try so I can compare later.",
            "The weather here changes a lot, which sometimes gets in the way.",
            "I am a beginner, so please avoid jargon where you can.",
            "I also want to know how to measure whether I am making progress.",
            "Some people told me to buy special equipment, but I doubt it is needed.",
            "I tend to lose motivation when I do not see results quickly.",
            "There is a deadline in about three months that I want to be ready for.",
            "I have a small apartment, so space is a real constraint."]


def workload_c_prompts(seed: int = 2026, max_tokens: int = 128) -> list[BenchRequest]:
    """Workload C: 64 fixed chat questions of 20 to 400 words (same list on every call)."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(20, 400, size=len(_TOPICS) * len(_QUESTIONS), endpoint=True)
    items = []
    for i, target in enumerate(targets):
        topic, question = _TOPICS[i % len(_TOPICS)], _QUESTIONS[i // len(_TOPICS)]
        head = f"I need help with {topic}.".split()
        tail = question.split()
        body = _context_words(rng, int(target) - len(head) - len(tail))
        items.append(BenchRequest(" ".join(head + body + tail), max_tokens, None))
    return items


def _context_words(rng: np.random.Generator, num_words: int) -> list[str]:
    """Exactly `num_words` words of background sentences, ending on a full stop."""
    words: list[str] = []
    while len(words) < num_words:
        words += _CONTEXT[int(rng.integers(len(_CONTEXT)))].split()
    words = words[:max(num_words, 0)]
    if words and not words[-1].endswith("."):
        words[-1] += "."
    return words


def chat_dataset(num_conversations: int = 8, num_turns: int = 4, system_words: int = 600, max_tokens: int = 128,
                 seed: int = 0) -> list[BenchRequest]:
    """Multi-turn conversations sharing one long system prompt; turn k carries turns 0..k-1."""
    rng = np.random.default_rng(seed)
    system = {"role": "system", "content": "You are a helpful assistant. Background: "
              + " ".join(_context_words(rng, system_words))}
    items = []
    for turn in range(num_turns):
        for conv in range(num_conversations):
            messages = [system]
            for k in range(turn + 1):
                topic = _TOPICS[(conv + k) % len(_TOPICS)]
                messages.append({"role": "user", "content": f"About {topic}: {_QUESTIONS[k % len(_QUESTIONS)]}"})
                if k < turn:
                    messages.append({"role": "assistant", "content": " ".join(_context_words(rng, 60))})
            items.append(BenchRequest(messages, max_tokens, None))
    return items


def jsonl_dataset(path: str, default_max_tokens: int = 128) -> list[BenchRequest]:
    """One `{"prompt": ..., "max_tokens": ...}` object a line; blank lines skipped; ValueError naming the line."""
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or "prompt" not in row:
                raise ValueError(f"{path}:{line_no}: expected an object with a 'prompt' field")
            items.append(BenchRequest(row["prompt"], int(row.get("max_tokens", default_max_tokens)), None))
    return items
