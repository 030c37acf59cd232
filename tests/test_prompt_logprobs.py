"""Prompt log-probabilities (what evaluation tools read through `echo` + `logprobs`): equal to HF's
log-softmax of the prompt, whole or chunked, with or without a cached prefix, at any tensor split."""

from __future__ import annotations

import pytest
import torch

from llmserve.sampling_params import SamplingParams
from tests.conftest import make_engine, make_hf_llama

PROMPT = [5, 17, 99, 3, 250, 41, 41, 8, 120, 77, 6, 200, 13, 9, 144, 31, 2, 60, 61, 62]


def hf_prompt_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].float()  # [P, V]
    return torch.log_softmax(logits, dim=-1)


def scored(engine, prompt: list[int], k: int = 3, request_id: str = "p", max_tokens: int = 2):
    engine.add_request(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, prompt_logprobs=k))
    found = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id and out.prompt_logprobs is not None:
                assert found is None, "prompt logprobs come once, with the first token"
                found = out.prompt_logprobs
    assert engine.kv.num_used_blocks == 0
    return found


@pytest.mark.parametrize("chunk", [256, 7])
def test_prompt_logprobs_equal_hf_whole_or_chunked(chunk):
    hf = make_hf_llama(2)
    engine = make_engine(hf, max_num_batched_tokens=chunk)
    got = scored(engine, PROMPT)
    want = hf_prompt_logprobs(hf, PROMPT)
    assert len(got) == len(PROMPT) - 1
    for position, token in enumerate(got, start=1):
        assert token.token_id == PROMPT[position]
        assert token.logprob == pytest.approx(want[position - 1, PROMPT[position]].item(), abs=1e-4)
        top_ids = want[position - 1].topk(3).indices.tolist()
        assert [i for i, _ in token.top_logprobs] == top_ids


def test_a_cached_prefix_does_not_cut_the_scores_short():
    """The second request shares the first's prompt: it recomputes it rather than hit the prefix cache."""
    hf = make_hf_llama(2)
    engine = make_engine(hf)
    engine.add_request("warm", PROMPT, SamplingParams(temperature=0.0, max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    got = scored(engine, PROMPT, k=0, max_tokens=1)  # it ends in the step that scores its prompt's end
    want = hf_prompt_logprobs(hf, PROMPT)
    assert [t.logprob for t in got] == pytest.approx(
        [want[p - 1, PROMPT[p]].item() for p in range(1, len(PROMPT))], abs=1e-4)
    assert all(t.top_logprobs == [] for t in got)


def test_prompt_logprobs_at_tp2_pp2_equal_hf(tmp_path):
    from llmserve.llm import LLM

    hf = make_hf_llama(2)
    hf.save_pretrained(tmp_path)
    with LLM(str(tmp_path), tensor_parallel_size=2, pipeline_parallel_size=2, num_blocks=64, block_size=4,
             max_num_batched_tokens=8) as llm:  # chunked: three prefill steps
        result = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1))[0]
    want = hf_prompt_logprobs(hf, PROMPT)
    assert result.prompt_logprobs[0] is None
    assert [t.logprob for t in result.prompt_logprobs[1:]] == pytest.approx(
        [want[p - 1, PROMPT[p]].item() for p in range(1, len(PROMPT))], abs=1e-4)
