"""Serving built engines: background builds (503 then 200, other models served meanwhile), a failing
build (its error reported, the server up), and `serve --engine` refusing another target's engine or
a TensorRT-LLM engine without tensorrt_llm."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import logging
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import yaml

from llmserve.build.profile import BuildProfile
from llmserve.build.repository import EngineRepository
from llmserve.cli import build_parser, main
from llmserve.config import CacheConfig, DeviceConfig, EngineConfig
from llmserve.server.builds import build_and_load
from llmserve.server.cli import app_from_args
from llmserve.server.config import ServerConfig
from llmserve.server.state import ENGINE, MODELS
from tests.conftest import make_hf_llama
from tests.server_helpers import ServerThread, make_tiny_engine, metric_values, wait_until

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None
PROFILE = BuildProfile(name="tiny", max_batch_size=8, max_num_tokens=256, max_seq_len=512, max_input_len=256,
                       kv_block_size=16)
BUILT_NUM_BLOCKS = 48
FIRST_NUM_BLOCKS = 32


@pytest.fixture(scope="module")
def hf_dir(tokenizer, tmp_path_factory):
    """A tiny random HF LLaMA over the SmolLM2 vocabulary, saved with that tokenizer."""
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    hf = make_hf_llama(1, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       max_position_embeddings=1024)
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def base_config() -> EngineConfig:
    return EngineConfig(model="unused", cache=CacheConfig(num_blocks=BUILT_NUM_BLOCKS),
                        device=DeviceConfig("cpu", "float32"))


def _request(url: str, body: dict | None = None) -> tuple[int, dict, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def _complete(server: ServerThread, model: str) -> tuple[int, dict, dict]:
    return _request(server.v1 + "/completions", {"model": model, "prompt": "Hello", "max_tokens": 3})


def _serve_args(*flags: str):
    return build_parser().parse_args(["serve", "--num-blocks", str(BUILT_NUM_BLOCKS), *flags])


def test_background_build_is_503_then_200_while_another_model_serves(tokenizer, hf_dir, tmp_path, caplog):
    repo = tmp_path / "engines"
    profile_file = tmp_path / "tiny.yaml"
    profile_file.write_text(yaml.safe_dump(PROFILE.to_dict()))
    gate = asyncio.Event()  # holds the build back until the 'building' state has been checked

    async def gated_build():
        await gate.wait()
        return await build_and_load(hf_dir, PROFILE, repo, base_config())

    server = ServerThread(make_tiny_engine(tokenizer, num_blocks=FIRST_NUM_BLOCKS),
                          ServerConfig(port=0, served_model_name="first"), building={"second": gated_build}).start()
    try:
        status, headers, body = _complete(server, "second")
        assert status == 503 and int(headers["Retry-After"]) >= 1
        assert body["error"]["type"] == "server_error" and "model second is being built" in body["error"]["message"]
        status, _, body = _complete(server, "first")
        assert status == 200 and body["model"] == "first" and body["usage"]["completion_tokens"] == 3
        status, _, health = _request(server.base_url + "/health")
        assert status == 503 and health == {"status": "building", "models": {"first": "ready", "second": "building"}}
        assert [m["id"] for m in _request(server.v1 + "/models")[2]["data"]] == ["first"]
        # the CLI's lookup misses too: `serve --model X --build-config P` would start with X building
        cli_app = app_from_args(_serve_args("--model", str(hf_dir), "--build-config", str(profile_file),
                                            "--repo", str(repo)))
        assert cli_app[MODELS].statuses() == {"tiny-llama": "building"} and ENGINE not in cli_app

        with caplog.at_level(logging.INFO, logger="llmserve.announce"):
            server.loop.call_soon_threadsafe(gate.set)
            wait_until(lambda: _request(server.base_url + "/health")[0] == 200, timeout=120, interval=0.2)
        assert "model 'second' is built and serving" in caplog.messages
        status, _, body = _complete(server, "second")
        assert status == 200 and body["model"] == "second" and body["usage"]["completion_tokens"] == 3
        assert [m["id"] for m in _request(server.v1 + "/models")[2]["data"]] == ["first", "second"]
        assert _request(server.v1 + "/models/second")[2]["max_model_len"] == PROFILE.max_seq_len
        metrics = metric_values(urllib.request.urlopen(server.base_url + "/metrics").read().decode())
        assert metrics["llmserve_kv_blocks_total"] == FIRST_NUM_BLOCKS + BUILT_NUM_BLOCKS
        assert metrics['llmserve_model_ready{model="second",status="ready"}'] == 1
        assert len(EngineRepository(repo).list()) == 1
    finally:
        server.stop()
    # now the repository has it: the same serve command loads it at once
    cli_app = app_from_args(_serve_args("--model", str(hf_dir), "--build-config", str(profile_file),
                                        "--repo", str(repo), "--served-model-name", "built", "--engine-in-process"))
    assert cli_app[MODELS].statuses() == {"built": "ready"}
    assert cli_app[ENGINE].info.max_model_len == PROFILE.max_seq_len  # the core in this process: loaded already
    # `serve --engine` names the model after the manifest, and `default` still reaches it
    engine_app = app_from_args(_serve_args("--engine", EngineRepository(repo).list()[0]["engine_dir"]))
    assert engine_app[MODELS].statuses() == {"tiny-llama": "ready"}
    assert engine_app[MODELS].select("default").name == "tiny-llama"


def test_two_ready_models_are_chosen_by_name(tokenizer):
    server = ServerThread(make_tiny_engine(tokenizer, num_blocks=FIRST_NUM_BLOCKS),
                          ServerConfig(port=0, served_model_name="a"),
                          extra_models={"b": make_tiny_engine(tokenizer, seed=1, num_blocks=16)}).start()
    try:
        assert [m["id"] for m in _request(server.v1 + "/models")[2]["data"]] == ["a", "b"]
        assert _complete(server, "b")[2]["model"] == "b"
        no_model = _request(server.v1 + "/completions", {"prompt": "Hi", "max_tokens": 2})[2]
        assert no_model["model"] == "a"  # the first ready model
        assert _request(server.base_url + "/health")[0] == 200
        metrics = metric_values(urllib.request.urlopen(server.base_url + "/metrics").read().decode())
        assert metrics["llmserve_kv_blocks_total"] == FIRST_NUM_BLOCKS + 16
        assert metrics["llmserve_kv_blocks_used"] == 0
    finally:
        server.stop()


def test_failed_build_reports_its_error_and_the_server_stays_up(tokenizer, hf_dir, tmp_path, caplog):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in hf_dir.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    build = functools.partial(build_and_load, broken, PROFILE, tmp_path / "engines", base_config())
    server = ServerThread(make_tiny_engine(tokenizer, num_blocks=FIRST_NUM_BLOCKS),
                          ServerConfig(port=0, served_model_name="first"), building={"broken": build}).start()
    try:
        wait_until(lambda: _request(server.base_url + "/health")[2]["status"] == "failed", timeout=120, interval=0.2)
        assert any(m.startswith("building model 'broken' failed: ") for m in caplog.messages)
        status, _, health = _request(server.base_url + "/health")
        assert status == 503 and health["models"] == {"first": "ready", "broken": "failed"}
        status, _, body = _complete(server, "broken")
        assert status == 500 and body["error"]["code"] == "model_build_failed"
        assert "model broken failed to build" in body["error"]["message"]
        assert "SafetensorError" in body["error"]["message"]  # the worker's own error, carried through
        assert _complete(server, "first")[0] == 200
        assert _complete(server, "nope")[0] == 404
    finally:
        server.stop()


def _hand_made_engine(tmp_path, backend: str):
    """An engine folder with only a manifest (built for an H100) and an empty payload folder."""
    engine_dir = tmp_path / "engine"
    (engine_dir / ("trtllm_engine" if backend == "trtllm" else "checkpoint")).mkdir(parents=True)
    manifest = {"status": "ready", "checkpoint_hash": "0" * 64, "checkpoint_dir": str(tmp_path), "model_name": "tiny",
                "profile": {**PROFILE.to_dict(), "backend": backend}, "backend": backend,
                "target": {"kind": "cuda", "compute_capability": "sm_90", "device_name": "NVIDIA H100 80GB HBM3"},
                "library_versions": {}, "built_at": "2026-01-01T00:00:00+00:00", "build_seconds": 1.0}
    (engine_dir / "manifest.json").write_text(json.dumps(manifest))
    return engine_dir


def test_serve_engine_refuses_another_targets_engine(tmp_path, capsys):
    engine_dir = _hand_made_engine(tmp_path, "native")
    assert main(["serve", "--engine", str(engine_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "CUDA sm_90" in err and "CPU" in err


@pytest.mark.skipif(HAS_TRTLLM, reason="tensorrt_llm is installed here: the missing-package message cannot show")
def test_serve_engine_of_a_trtllm_build_says_tensorrt_llm_is_missing_in_one_line(tmp_path):
    engine_dir = _hand_made_engine(tmp_path, "trtllm")
    result = subprocess.run([sys.executable, "-m", "llmserve.cli", "serve", "--engine", str(engine_dir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: TrtllmEngine needs TensorRT-LLM")
    assert "tensorrt_llm" in result.stderr and "pypi.nvidia.com" in result.stderr
