"""The `llmserve` CLI on bad input: one `error: ...` line on stderr, a non-zero status, no traceback, nothing
written; `--help` shows defaults; `--log-level` is accepted before and after the subcommand."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmserve.cli import build_parser
from tests.conftest import make_hf_llama

REPO_ROOT = Path(__file__).resolve().parents[1]
CUDA_PROFILE = REPO_ROOT / "build_configs" / "smollm2-cuda.yaml"


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmserve.cli", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The single stderr line of a failed command, checked to hold each of `fragments`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    make_hf_llama(seed=5).save_pretrained(path)
    return path


def test_generate_with_a_missing_model_dir(tmp_path):
    result = run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert_one_error_line(result, "does not exist", str(tmp_path / "nope"))


@pytest.mark.parametrize("flags, message", [
    (["--quantization", "int8", "--device", "cuda"], "int8 quantization runs on CPU only"),
    (["--device", "gpu"], "device must be cpu, cuda or cuda:N, got 'gpu'"),
    (["--block-size", "12"], "block_size must be a power of two, got 12"),  # a config check, once an assert
    (["--max-tokens", "0"], "max_tokens must be >= 1"),
])
def test_generate_with_impossible_flags(hf_dir, flags, message):
    assert_one_error_line(run_cli("generate", "--model", str(hf_dir), "--prompt", "hi", *flags), message)


def test_converting_a_converted_checkpoint_says_to_use_it_directly(hf_dir, tmp_path):
    from llmserve.checkpoint.convert import convert_checkpoint

    converted = convert_checkpoint(hf_dir, tmp_path / "converted", progress=False)
    result = run_cli("convert", "--model", str(converted), "--out", str(tmp_path / "again"))
    assert_one_error_line(result, "already a TensorRT-LLM checkpoint", "llmserve serve", "llmserve build")
    assert not (tmp_path / "again").exists()


def test_convert_out_under_a_file(hf_dir, tmp_path):
    (tmp_path / "some_file").write_text("not a folder")
    result = run_cli("convert", "--model", str(hf_dir), "--out", str(tmp_path / "some_file" / "sub"))
    assert_one_error_line(result, f"{tmp_path / 'some_file'} is a file, not a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["some_file"]


def test_convert_refuses_a_folder_holding_something_else(hf_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_cli("convert", "--model", str(hf_dir), "--out", str(tmp_path))
    assert_one_error_line(result, "not empty and holds no converted checkpoint")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_cuda_profile_is_refused_on_a_cpu_target(hf_dir, tmp_path):
    result = run_cli("build", "--checkpoint", str(hf_dir), "--config", str(CUDA_PROFILE), "--device", "cpu",
                     "--repo", str(tmp_path / "engines"))
    assert_one_error_line(result, "'smollm2-cuda' is written for CUDA", "build target is CPU", "--device cuda")
    assert not (tmp_path / "engines").exists()


def test_engines_in_a_missing_repository(tmp_path):
    assert_one_error_line(run_cli("engines", "--repo", str(tmp_path / "nope")), "does not exist")


def test_engines_in_an_empty_repository(tmp_path):
    result = run_cli("engines", "--repo", str(tmp_path))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", f"no engines in {tmp_path}\n")


@pytest.mark.parametrize("position", ["before", "after"])
def test_log_level_before_or_after_the_subcommand(tmp_path, position):
    # A manifest without its fields is a bug-shaped failure: one "internal error" line by default,
    # the whole traceback at DEBUG, wherever --log-level is given.
    (tmp_path / "model-123" / "profile" / "cpu").mkdir(parents=True)
    (tmp_path / "model-123" / "profile" / "cpu" / "manifest.json").write_text(json.dumps({}))
    quiet = run_cli("engines", "--repo", str(tmp_path))
    assert quiet.returncode == 1
    assert quiet.stderr.startswith("internal error: KeyError") and "--log-level DEBUG" in quiet.stderr
    assert len(quiet.stderr.strip().splitlines()) == 1
    flag = ["--log-level", "debug"]
    argv = [*flag, "engines", "--repo", str(tmp_path)] if position == "before" else ["engines", "--repo",
                                                                                      str(tmp_path), *flag]
    loud = run_cli(*argv)
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "KeyError" in loud.stderr


def test_unknown_log_level_is_a_usage_error(tmp_path):
    result = run_cli("engines", "--repo", str(tmp_path), "--log-level", "LOUD")
    assert result.returncode == 2 and "invalid choice: 'LOUD'" in result.stderr and "Traceback" not in result.stderr


def test_help_shows_defaults():
    result = run_cli("build", "--help")
    text = " ".join(result.stdout.split())
    assert result.returncode == 0
    assert "--repo REPO engine repository root (default: engines)" in text
    assert "(default: cpu)" in text and "(default: WARNING)" in text


def subparsers(parser: argparse.ArgumentParser):
    """Every parser below `parser`, recursively (`bench serve` included)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield child
                yield from subparsers(child)


def option_help(help_text: str, option: str) -> str:
    """The help paragraph of `option` in a formatted --help, on one line."""
    match = re.search(rf"^  {re.escape(option)}(?=[ ,\n]).*?(?=^  -|\Z)", help_text, flags=re.M | re.S)
    assert match, option
    return " ".join(match.group(0).split())


def test_every_subcommand_help_names_each_meaningful_default():
    checked = 0
    for parser in subparsers(build_parser()):
        help_text = parser.format_help()
        for action in parser._actions:
            default = action.default
            if not action.option_strings or default in (None, [], argparse.SUPPRESS) or default is False:
                continue
            assert "default" in option_help(help_text, action.option_strings[0]), (parser.prog, action.dest)
            checked += 1
    assert checked > 40  # generate, serve, chat, convert, build, engines and bench all took part
