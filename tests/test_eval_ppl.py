"""`llmserve eval ppl`: held-out perplexity computed by the engine equals HuggingFace's on the same texts."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmserve.evaluate.perplexity import heldout_texts, is_heldout
from tests.test_mp_server import checkpoint  # noqa: F401 (fixture)

SENTENCES = ["The river runs past the old mill and into the valley below the hills.",
             "Bake the bread for forty minutes, then let it cool on a rack before slicing.",
             "Our team met on Tuesday to plan the launch of the new website and its blog.",
             "A short one.", "Stars are far away; their light left them long before we were born."]


def _sharegpt_file(tmp_path) -> tuple[str, list[dict]]:
    """Records with ids chosen so that some are held out and some are not."""
    records, i = [], 0
    for n, sentence in enumerate(SENTENCES * 2):
        while is_heldout({"id": f"r{i}"}) != (n % 2 == 0):
            i += 1
        records.append({"id": f"r{i}", "conversations": [{"from": "human", "value": f"Tell me something ({n})."},
                                                         {"from": "gpt", "value": sentence}]})
        i += 1
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records)[:-40])  # cut off inside the last record, as the package's file is
    return str(path), records


def test_the_engines_perplexity_is_hfs(checkpoint, tmp_path):
    dataset, records = _sharegpt_file(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    from llmserve.bench.sharegpt import load_conversations

    texts = heldout_texts(load_conversations(dataset), tokenizer, num_texts=10, max_len=24)
    assert texts and all(16 <= len(t) <= 24 for t in texts)
    assert len(texts) < len(records) // 2 + 1  # only held-out records, the short one and the cut one skipped
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)
    nll = count = 0
    with torch.no_grad():
        for ids in texts:
            logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
            nll -= sum(logprobs[p - 1, ids[p]].item() for p in range(1, len(ids)))
            count += len(ids) - 1
    done = subprocess.run([sys.executable, "-m", "llmserve.cli", "eval", "ppl", "--model", str(checkpoint),
                           "--dataset-path", dataset, "--num-texts", "10", "--max-len", "24"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["num_texts"] == len(texts) and result["num_tokens"] == count
    assert math.isclose(result["perplexity"], math.exp(nll / count), rel_tol=1e-4)


def test_first_divergence_finds_where_two_models_part():
    from llmserve.evaluate.perplexity import first_divergence
    from llmserve.llm import LLM
    from tests.conftest import make_engine, make_hf_llama

    prompts = [[5, 17, 42, 99, 3], [8, 8, 120, 7], [200, 1, 64, 33, 90, 11]]
    same = make_hf_llama(seed=0)
    with LLM(engine=make_engine(same)) as a, LLM(engine=make_engine(same)) as b, \
            LLM(engine=make_engine(make_hf_llama(seed=1))) as other:
        alike = first_divergence(a, b, prompts, max_tokens=12)
        apart = first_divergence(a, other, prompts, max_tokens=12)
    assert alike["identical"] == 1.0 and alike["median_first_divergence"] == 12
    assert apart["identical"] < 1.0 and apart["mean_first_divergence"] < 12


def test_divergence_prompts_are_held_out_chat_prompts(tokenizer):
    from llmserve.evaluate.perplexity import heldout_prompts

    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"Tell me about river number {i}."},
                                                 {"from": "gpt", "value": "A river."}]} for i in range(40)]
    prompts = heldout_prompts(records, tokenizer, num_prompts=100, max_len=512)
    held_out = [r for r in records if is_heldout(r)]
    assert len(prompts) == len(held_out) > 0
    for ids, record in zip(prompts, held_out):
        text = tokenizer.decode(ids)
        assert record["conversations"][0]["value"] in text and text.rstrip().endswith("assistant")
