"""Bad input to `llmserve bench`: one line on stderr, a non-zero status, no traceback, nothing sent or written."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llmserve.cli import main as llmserve_main
from tests.fake_openai_server import FakeScript, server_in_thread

REPO = Path(__file__).resolve().parents[1]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmserve.cli", "bench", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def one_error_line(proc: subprocess.CompletedProcess, status: int = 1) -> str:
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def serve_args(base_url: str, *extra: str) -> list[str]:
    return ["serve", "--base-url", base_url, "--endpoint", "completions", "--num-prompts", "3", "--input-len-min", "4",
            "--input-len-max", "6", "--output-len", "2", "--no-progress", *extra]


def test_compare_refuses_what_is_not_a_bench_result(tmp_path):
    not_result, not_json, a_list = tmp_path / "config.json", tmp_path / "notes.txt", tmp_path / "list.json"
    not_result.write_text(json.dumps({"architecture": "LlamaForCausalLM"}))
    not_json.write_text("hello")
    a_list.write_text("[1, 2]")
    assert one_error_line(bench("compare", not_result)) == (
        f"llmserve bench: error: {not_result} is not a bench result (no 'runs' with aggregates; "
        "`llmserve bench serve --out FILE` writes one)")
    assert f"{a_list} is not a bench result" in one_error_line(bench("compare", a_list))
    assert f"{not_json} is not a bench result (not JSON: " in one_error_line(bench("compare", not_json))
    assert one_error_line(bench("compare", tmp_path / "nope.json")).endswith(f"{tmp_path / 'nope.json'}: no such file")


def test_model_not_served_stops_before_any_request(tmp_path):
    with server_in_thread(FakeScript(models=["llama-8b", "smollm2"])) as server:
        proc = bench(*serve_args(server.base_url, "--model", "m", "--out", tmp_path / "r.json"))
        assert server.num_requests == 0
    assert one_error_line(proc) == ("llmserve bench: error: the server does not serve model 'm'; it serves "
                                    "'llama-8b', 'smollm2': pass one of them to --model")
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_is_one_line():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    line = one_error_line(bench(*serve_args(f"http://127.0.0.1:{port}/v1", "--model", "m")))
    assert line.startswith(f"llmserve bench: error: cannot connect to http://127.0.0.1:{port}/v1 (")
    assert line.endswith("is the server running, and is --base-url right?")


@pytest.mark.parametrize("extra, message", [
    (["--out", "/nonexistent-dir/r.json"], "--out /nonexistent-dir/r.json: the directory /nonexistent-dir does not "
                                           "exist"),
    (["--dataset", "jsonl"], "--dataset jsonl needs --dataset-path FILE"),
    (["--dataset", "jsonl", "--dataset-path", "/nonexistent.jsonl"], "cannot read --dataset-path /nonexistent.jsonl"),
    (["--input-len-min", "9"], "--input-len-min 9 is above --input-len-max 6"),
])
def test_bad_serve_input_is_one_line_before_sending(extra, message):
    with server_in_thread(FakeScript()) as server:
        line = one_error_line(bench(*serve_args(server.base_url, "--model", "m", *extra)))
        assert server.num_requests == 0
    assert line.startswith(f"llmserve bench: error: {message}")


def test_bad_flag_values_are_usage_errors():
    proc = bench(*serve_args("http://127.0.0.1:9", "--model", "m", "--slo", "latency=5ms"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("bad SLO 'latency=5ms': expected one of ('ttft', 'tpot', "
                                                         "'e2e') = <number>[ms|s]")
    proc = bench(*serve_args("http://127.0.0.1:9", "--model", "m", "--concurrency", "0"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].endswith("must be > 0, got 0")


def test_server_without_a_model_list_gets_a_warning_and_the_run(tmp_path, capsys):
    out = tmp_path / "r.json"
    with server_in_thread(FakeScript(first_delay=0.01, gap=0.005, models=None)) as server:
        code = llmserve_main(["bench", *serve_args(server.base_url, "--model", "anything", "--out", str(out),
                                                    "--metrics-interval-ms", "0")])
    stderr = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and len(json.loads(out.read_text())["runs"][0]["records"]) == 3
    assert stderr == [f"llmserve bench: warning: GET {server.base_url}/v1/models gave no model list (HTTP 404): "
                      "not checking that the server serves 'anything'"]
