"""The OpenAI API over real HTTP, with the official client (sync and async) and raw SSE."""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest

from tests.server_helpers import make_tiny_engine, metric_values, start_server

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server(tokenizer):
    server = start_server(make_tiny_engine(tokenizer), served_model_name="tiny")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def _chat(client, **fields):
    return client.chat.completions.create(model="tiny", messages=MESSAGES, **fields)


def _stream_chat(client, **fields) -> list:
    return list(_chat(client, stream=True, **fields))


def _content(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# ---- chat ---------------------------------------------------------------------------------
def test_logit_bias_forces_and_bans_tokens_on_both_endpoints(client, tokenizer):
    (forced,) = tokenizer.encode(" hello", add_special_tokens=False)
    pushed = _chat(client, max_tokens=6, temperature=1.0, seed=1, logit_bias={str(forced): 100},
                   extra_body={"ignore_eos": True})
    assert pushed.choices[0].message.content == " hello" * 6
    completion = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=4, temperature=0,
                                           logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert completion.choices[0].text == " hello" * 4
    plain = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=1, temperature=0)
    (first,) = tokenizer.encode(plain.choices[0].text, add_special_tokens=False)
    banned = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=1, temperature=0,
                                       logit_bias={str(first): -100})
    assert banned.choices[0].text not in ("", plain.choices[0].text)



def test_streamed_text_joined_equals_non_streamed_text(client):
    whole = _chat(client, max_tokens=24, seed=7, temperature=1.0)
    chunks = _stream_chat(client, max_tokens=24, seed=7, temperature=1.0)
    assert whole.choices[0].message.content == _content(chunks)
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason


def test_same_seed_same_text_different_seed_differs(client):
    first, again, other = (_chat(client, max_tokens=16, seed=s).choices[0].message.content for s in (3, 3, 4))
    assert first == again != other


def test_usage_counts_agree_with_tokenizer(client, tokenizer):
    response = _chat(client, max_tokens=12, logprobs=True, extra_body={"ignore_eos": True})
    prompt_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == len(response.choices[0].logprobs.content) == 12
    assert response.usage.total_tokens == len(prompt_ids) + 12
    assert response.choices[0].finish_reason == "length"


def test_n2_gives_two_choices_in_both_modes(client):
    whole = _chat(client, max_tokens=8, seed=11, n=2)
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.choices[0].message.content != whole.choices[1].message.content
    chunks = _stream_chat(client, max_tokens=8, seed=11, n=2)
    streamed = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
                for i in (0, 1)}
    assert streamed == {c.index: c.message.content for c in whole.choices}
    assert whole.usage.completion_tokens == 16


def test_include_usage_gives_final_usage_chunk(client):
    chunks = _stream_chat(client, max_tokens=6, stream_options={"include_usage": True})
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"


def test_stream_starts_with_role_delta(client):
    chunks = _stream_chat(client, max_tokens=4)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].finish_reason is None


def test_chat_logprobs_shape(client):
    response = _chat(client, max_tokens=5, logprobs=True, top_logprobs=3, temperature=0)
    entries = response.choices[0].logprobs.content
    assert len(entries) == 5
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)  # greedy took the best
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


async def test_async_client_streams_the_same_as_sync(server, client):
    async_client = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    stream = await async_client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, seed=5,
                                                        stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == _chat(client, max_tokens=10, seed=5).choices[0].message.content
    await async_client.close()


# ---- completions ---------------------------------------------------------------------------
def test_completion_prompt_forms_agree(client, tokenizer):
    ids = tokenizer.encode("The cat")
    by_text = client.completions.create(model="tiny", prompt="The cat", max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    batch = client.completions.create(model="tiny", prompt=["The cat", "A dog"], max_tokens=6, temperature=0)
    batch_ids = client.completions.create(model="tiny", prompt=[ids, tokenizer.encode("A dog")], max_tokens=6,
                                          temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text == batch.choices[0].text
    assert [c.text for c in batch.choices] == [c.text for c in batch_ids.choices]
    assert batch.usage.prompt_tokens == len(ids) + len(tokenizer.encode("A dog"))


def test_completion_stream_equals_whole_with_echo(client):
    whole = client.completions.create(model="tiny", prompt="Once upon", max_tokens=10, seed=2, echo=True)
    chunks = list(client.completions.create(model="tiny", prompt="Once upon", max_tokens=10, seed=2, echo=True,
                                            stream=True))
    assert whole.choices[0].text.startswith("Once upon")
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_logprobs_legacy_shape(client, tokenizer):
    prompt_ids = tokenizer.encode("Hello there")
    response = client.completions.create(model="tiny", prompt="Hello there", max_tokens=4, logprobs=2, echo=True,
                                         temperature=0)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(prompt_ids) + 4 == len(logprobs.token_logprobs) == len(logprobs.text_offset)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing precedes it
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert all(2 <= len(top) <= 3 for top in logprobs.top_logprobs[1:len(prompt_ids)])  # top 2 + the prompt's own
    assert all(len(top) == 2 for top in logprobs.top_logprobs[len(prompt_ids):])  # greedy: the sampled one is the top
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0


def test_echo_with_max_tokens_0_scores_the_prompt_like_hf(client, tokenizer):
    """What evaluation tools send (lm-eval's loglikelihood): every prompt token's logprob but the first."""
    import torch

    from tests.conftest import make_hf_llama

    hf = make_hf_llama(0, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, max_position_embeddings=1024)
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    with torch.no_grad():
        want = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    expected = [want[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    logprobs = whole.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert whole.choices[0].text == tokenizer.decode(prompt) and whole.usage.completion_tokens == 0
    assert whole.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0,
                                            stream=True))
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(expected, abs=1e-4)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == tokenizer.decode(prompt)


def _hf_prompt_logprobs(tokenizer, prompt: list[int]):
    import torch

    from tests.conftest import make_hf_llama

    hf = make_hf_llama(0, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, max_position_embeddings=1024)
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)  # [P, V]: row i predicts i + 1


def _check_vllm_prompt_logprobs(entries, prompt: list[int], want, k: int, pieces) -> None:
    assert entries[0] is None and len(entries) == len(prompt)
    for position, entry in enumerate(entries[1:], start=1):
        row, token = want[position - 1], prompt[position]
        own = entry[str(token)]
        assert own["logprob"] == pytest.approx(row[token].item(), abs=1e-4)
        assert own["rank"] == 1 + int((row > row[token]).sum())
        assert own["decoded_token"] == pieces.text(token)
        best = row.topk(k).indices.tolist()
        assert set(entry) == {str(token), *map(str, best)}  # the prompt token and the k best
        assert [entry[str(t)]["rank"] for t in best] == list(range(1, k + 1)) or token in best


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_logprobs_extension_on_both_endpoints(server, tokenizer, stream):
    """vLLM's `prompt_logprobs`: null, then per prompt token a dict of it and the k best, with rank and text."""
    from llmserve.server.logprobs import TokenPieces

    pieces, k = TokenPieces(tokenizer), 2
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    want = _hf_prompt_logprobs(tokenizer, prompt)
    completion = _post_json(server.v1 + "/completions",
                            {"model": "tiny", "prompt": prompt, "max_tokens": 2, "prompt_logprobs": k, "stream": stream})
    if stream:
        entries = next(c["choices"][0]["prompt_logprobs"] for c in completion if "prompt_logprobs" in c["choices"][0])
    else:
        entries = completion["choices"][0]["prompt_logprobs"]
    _check_vllm_prompt_logprobs(entries, prompt, want, k, pieces)
    from llmserve.frontend.chat_template import encode_chat

    chat_prompt = encode_chat(tokenizer, MESSAGES)  # what the server encodes
    chat = _post_json(server.v1 + "/chat/completions",
                      {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, "prompt_logprobs": k, "stream": stream})
    entries = next(c["prompt_logprobs"] for c in chat if "prompt_logprobs" in c) if stream else chat["prompt_logprobs"]
    _check_vllm_prompt_logprobs(entries, chat_prompt, _hf_prompt_logprobs(tokenizer, chat_prompt), k, pieces)


def _post_json(url: str, body: dict):
    """The response body (200 only), or the list of a stream's JSON events."""
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read().decode()
    if not body.get("stream"):
        return json.loads(text)
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


@pytest.mark.parametrize("top", [0, 2])
def test_completion_top_logprobs_always_hold_the_sampled_token(client, top):
    """OpenAI: up to logprobs + 1 entries, the sampled token among them (logprobs: 0 -> just that one)."""
    response = client.completions.create(model="tiny", prompt="Hello there", max_tokens=8, logprobs=top,
                                         temperature=1.0, seed=5)
    logprobs = response.choices[0].logprobs
    for token, logprob, entries in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert entries[token] == logprob
        assert top <= len(entries) <= top + 1
    if top == 0:
        assert all(len(entries) == 1 for entries in logprobs.top_logprobs)


def test_completion_n_times_prompts_choices(client):
    response = client.completions.create(model="tiny", prompt=["a", "b"], n=2, max_tokens=3, seed=1)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.usage.completion_tokens == sum(3 for _ in response.choices)


# ---- the rest of the surface ------------------------------------------------------------------
def test_models_lists_served_name(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


async def test_sse_framing_and_request_id(server):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(server.v1 + "/chat/completions", json=body,
                                headers={"x-request-id": "my-id-1"}) as response:
            raw = await response.read()
            assert response.headers["x-request-id"] == "my-id-1"
            assert response.headers["content-type"].startswith("text/event-stream")
        async with session.get(server.base_url + "/health") as response:
            assert response.status == 200 and len(response.headers["x-request-id"]) == 32
    frames = raw.decode().split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    assert all(f.startswith("data: ") for f in frames[:-1])
    assert all(json.loads(f[6:])["object"] == "chat.completion.chunk" for f in frames[:-2])


def test_metrics_expose_the_required_names(server, client):
    _chat(client, max_tokens=2)
    import urllib.request

    text = urllib.request.urlopen(server.base_url + "/metrics").read().decode()
    values = metric_values(text)
    for name in ["llmserve_requests_running", "llmserve_requests_waiting", "llmserve_kv_blocks_total",
                 "llmserve_kv_blocks_used", "llmserve_kv_blocks_cached", "llmserve_prefix_cache_hits_total",
                 "llmserve_prompt_tokens_total", "llmserve_generation_tokens_total",
                 'llmserve_requests_total{finish_reason="length"}', "llmserve_time_to_first_token_seconds_count",
                 "llmserve_inter_token_latency_seconds_count", "llmserve_e2e_request_latency_seconds_count"]:
        assert name in values, name
    assert values["llmserve_kv_blocks_total"] == 256
    assert values["llmserve_time_to_first_token_seconds_count"] >= 1
