"""Model names: one canonical name per model, `default` always naming the first, duplicates refused."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request

import openai
import pytest

from llmserve.cli import build_parser
from llmserve.server.cli import served_name
from llmserve.server.config import ServerConfig
from llmserve.server.models import DuplicateModelNameError, ModelRegistry
from tests.server_helpers import ServerThread, engine_client, make_tiny_engine, wait_until

USER = [{"role": "user", "content": "Hi"}]


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def two_models(tokenizer):
    """'tiny' first (so also 'default'), 'other' second."""
    server = ServerThread(make_tiny_engine(tokenizer, num_blocks=32), ServerConfig(port=0, served_model_name="tiny"),
                          extra_models={"other": make_tiny_engine(tokenizer, seed=1, num_blocks=32)}).start()
    yield server
    server.stop()


def test_default_is_an_alias_of_the_first_model_and_answers_with_its_name(two_models):
    client = openai.OpenAI(base_url=two_models.v1, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="default", messages=USER, max_tokens=2)
    assert reply.model == "tiny" and reply.usage.completion_tokens == 2
    assert client.completions.create(model="other", prompt="Hi", max_tokens=2).model == "other"
    assert client.completions.create(model="tiny", prompt="Hi", max_tokens=2).model == "tiny"


def test_models_list_canonical_ids_only_and_the_alias_resolves(two_models):
    status, listing = _get(two_models.v1 + "/models")
    assert status == 200 and [m["id"] for m in listing["data"]] == ["tiny", "other"]
    status, card = _get(two_models.v1 + "/models/default")
    assert status == 200 and card["id"] == "tiny"


def test_unknown_model_404_names_the_served_models_and_the_alias(two_models):
    status, body = _get(two_models.v1 + "/models/nope")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert "'tiny', 'other'" in body["error"]["message"] and "'default'" in body["error"]["message"]


def test_default_names_the_first_model_even_while_it_builds(tokenizer):
    engine = make_tiny_engine(tokenizer, num_blocks=16)

    async def never_finishes():
        await asyncio.Event().wait()

    async def at_once():
        return engine_client(engine)

    server = ServerThread(None, ServerConfig(port=0), building={"main": never_finishes, "ready": at_once}).start()
    try:
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
        wait_until(lambda: _get(server.v1 + "/models")[1]["data"])
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model="default", prompt="Hi", max_tokens=2)
        assert info.value.status_code == 503 and "model main is being built" in info.value.message
        assert client.completions.create(model="ready", prompt="Hi", max_tokens=2).model == "ready"
    finally:
        server.stop()


def test_registry_refuses_a_duplicate_name_and_default_for_another_model(tokenizer):
    registry = ModelRegistry()
    registry.add_building("a", lambda: None)
    with pytest.raises(DuplicateModelNameError, match="two models would be served as 'a'"):
        registry.add_building("a", lambda: None)
    with pytest.raises(DuplicateModelNameError, match="alias of the first model"):
        registry.add_building("default", lambda: None)
    assert registry.find("default").name == "a" and registry.find(None).name == "a"


@pytest.mark.parametrize("flags, expected", [
    (["--model", "default"], "smollm2-135m-instruct"),
    (["--model", "/models/My-Llama/"], "My-Llama"),
    (["--model", "/models/My-Llama", "--served-model-name", "mine"], "mine"),
])
def test_the_served_name_rule(flags, expected):
    assert served_name(build_parser().parse_args(["serve", *flags])) == expected


def test_engine_manifest_name_wins_over_model_unless_renamed():
    args = build_parser().parse_args(["serve", "--engine", "/engines/x"])
    assert served_name(args, "tiny-llama") == "tiny-llama"
    renamed = build_parser().parse_args(["serve", "--engine", "/engines/x", "--served-model-name", "t"])
    assert served_name(renamed, "tiny-llama") == "t"


def test_serve_refuses_the_same_model_twice_in_one_line(tmp_path):
    model = tmp_path / "my-llama"
    result = subprocess.run(
        [sys.executable, "-m", "llmserve.cli", "serve", "--model", str(model),
         "--also-build", f"{model}=build_configs/smollm2-cpu.yaml"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: two models would be served as 'my-llama'")
    assert "--served-model-name" in result.stderr
