"""The start-up banner: names, device, dtype, quantization, KV capacity and the URL, in a few lines."""

from __future__ import annotations

import pytest

from llmserve.server.announce import banner_lines, client_url
from llmserve.server.config import ServerConfig
from llmserve.server.models import ModelRegistry
from tests.server_helpers import engine_client, make_tiny_engine


def test_banner_names_the_model_its_alias_device_and_kv_capacity(tokenizer):
    registry = ModelRegistry()
    registry.add_ready("tiny", engine_client(make_tiny_engine(tokenizer, num_blocks=256, block_size=16), "inproc"))
    registry.add_building("later", lambda: None)
    lines = banner_lines(ServerConfig(port=0), registry, 8123)
    assert len(lines) == 5
    assert "http://127.0.0.1:8123/v1" in lines[0]
    assert lines[1] == ("model 'tiny' (also 'default'): device cpu, dtype float32, quantization none, "
                        "KV cache dtype float32")
    # 256 blocks x 16 = 4096 KV tokens; max_model_len = min(8192 flag, 1024 positions, 4096) = 1024
    assert lines[2] == ("model 'tiny': KV cache 256 blocks x 16 tokens = 4096 tokens; max_model_len 1024, "
                        "so 4 sequences fit at full context (max_num_seqs 32)")
    assert lines[3] == ("model 'tiny': sampling defaults of the OpenAI API (its generation_config.json sets none)")
    assert lines[4].startswith("model 'later': building in the background; requests for it get 503")


def test_a_model_served_as_default_has_no_alias_note(tokenizer):
    registry = ModelRegistry()
    registry.add_ready("default", engine_client(make_tiny_engine(tokenizer, num_blocks=16), "inproc"))
    assert banner_lines(ServerConfig(port=0), registry, 1)[1].startswith("model 'default': device cpu")


@pytest.mark.parametrize("host, url", [("127.0.0.1", "http://127.0.0.1:8000/v1"),
                                       ("0.0.0.0", "http://127.0.0.1:8000/v1"),
                                       ("::", "http://[::1]:8000/v1"),
                                       ("example.internal", "http://example.internal:8000/v1")])
def test_client_url_is_one_a_local_client_can_use(host, url):
    assert client_url(host, 8000) == url
