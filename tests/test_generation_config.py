"""A model's generation_config.json gives the sampling defaults of omitted fields (--generation-config auto)."""

from __future__ import annotations

import json
import shutil

import asyncio

import aiohttp
import pytest

from llmserve.frontend.generation_config import generation_defaults
from llmserve.server.protocol import Limits, parse_completion
from tests.test_mp_server import checkpoint, served  # noqa: F401 (fixture)


def test_sampling_fields_are_read_and_bad_values_ignored(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 300, "do_sample": True, "bos_token_id": 1}))
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 300}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    assert generation_defaults(tmp_path) == {}
    assert generation_defaults(tmp_path / "missing") == {} and generation_defaults(None) == {}


def test_omitted_fields_take_the_defaults_given_ones_win(tokenizer):
    limits = Limits(vocab_size=len(tokenizer), max_n=4, max_prompts=4,
                    defaults={"temperature": 0.6, "top_k": 20, "max_tokens": 300})
    params = parse_completion({"prompt": "hi"}, tokenizer, limits).params
    assert (params.temperature, params.top_k, params.max_tokens, params.top_p) == (0.6, 20, 300, 1.0)
    params = parse_completion({"prompt": "hi", "temperature": 1.0, "max_tokens": 3}, tokenizer, limits).params
    assert (params.temperature, params.top_k, params.max_tokens) == (1.0, 20, 3)


@pytest.mark.parametrize("flag", ["auto", "none"])
def test_the_server_applies_the_models_defaults_unless_told_not_to(checkpoint, tmp_path, flag):
    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 5}))

    async def twice(base: str) -> list[dict]:
        async with aiohttp.ClientSession() as session:
            bodies = []
            for _ in range(2):  # neither temperature nor max_tokens: the defaults decide
                async with session.post(base + "/v1/completions",
                                        json={"prompt": "Hello there", "ignore_eos": True}) as response:
                    assert response.status == 200
                    bodies.append(await response.json())
            return bodies

    with served(model, "--generation-config", flag, tmp_path=tmp_path) as server:
        first, second = asyncio.run(twice(server.base))
        if flag == "auto":  # greedy, 5 tokens: the model's own defaults
            assert first["usage"]["completion_tokens"] == 5 and first["choices"][0]["text"] == second["choices"][0]["text"]
        else:  # the API's: temperature 1 and 16 tokens for completions
            assert first["usage"]["completion_tokens"] == 16 and first["choices"][0]["text"] != second["choices"][0]["text"]
    assert ("temperature=0.0, max_tokens=5" in server.log_text()) == (flag == "auto")


def test_default_max_tokens_applies_to_requests_that_set_none(checkpoint, tmp_path):
    """--default-max-tokens beats the model's max_new_tokens; a request's own max_tokens beats both."""
    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5}))

    async def ask(base: str) -> list[int]:
        counts = []
        async with aiohttp.ClientSession() as session:
            for path, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                               ("/v1/completions", {"prompt": "Hello there"}),
                               ("/v1/completions", {"prompt": "Hello there", "max_tokens": 2})]:
                async with session.post(base + path, json={**body, "ignore_eos": True}) as response:
                    assert response.status == 200
                    counts.append((await response.json())["usage"]["completion_tokens"])
        return counts

    with served(model, "--default-max-tokens", "7", tmp_path=tmp_path) as server:
        assert asyncio.run(ask(server.base)) == [7, 7, 2]
    assert "requests that set no max_tokens get 7 (--default-max-tokens)" in server.log_text()
