"""Ctrl-C (SIGINT) in `llmserve convert`, `build` and `generate`: the line "interrupted", exit status 130,
no traceback, and nothing half-written left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
# The HF reader opens the weights file once per tensor and parses its header each time, so a checkpoint
# of many tiny layers converts for seconds (300 layers: ~25 s) while weighing almost nothing: time to
# interrupt it well before the build could finish.
NUM_LAYERS = 300

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def save_many_layer_llama(path: Path, num_layers: int, hidden: int = 16, intermediate: int = 32,
                          vocab: int = 64) -> Path:
    """An HF LLaMA checkpoint of `num_layers` tiny layers (zero weights: only the conversion is timed)."""
    path.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": num_layers,
              "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": True,
              "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}
    (path / "config.json").write_text(json.dumps(config))
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
              "mlp.down_proj": (hidden, intermediate), "input_layernorm": (hidden,),
              "post_attention_layernorm": (hidden,)}
    tensors = {"model.embed_tokens.weight": torch.zeros(vocab, hidden), "model.norm.weight": torch.ones(hidden)}
    for layer in range(num_layers):
        tensors.update({f"model.layers.{layer}.{name}.weight": torch.zeros(shape) for name, shape in shapes.items()})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def slow_to_convert(tmp_path_factory) -> Path:
    return save_many_layer_llama(tmp_path_factory.mktemp("src") / "many-layers", NUM_LAYERS)


class CliProcess:
    """`python -m llmserve.cli ARGV` with its stderr collected line by line while it runs."""

    def __init__(self, *argv: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "llmserve.cli", *argv], cwd=REPO_ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stderr_lines: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def wait_until(self, predicate, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, f"exited early: {''.join(self.stderr_lines)}"
            assert time.monotonic() < deadline, "timed out waiting for the command to start its work"
            time.sleep(0.01)

    def interrupt(self, timeout: float = 120.0) -> tuple[int, str]:
        """Send SIGINT; (exit status, whole stderr) once it exits."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.stdout.read()
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code, "".join(self.stderr_lines)


def assert_interrupted(code: int, stderr: str) -> None:
    assert code == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1] == "interrupted", stderr


def processes_mentioning(text: str) -> list[str]:
    """Command lines of the live processes whose argv contains `text`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        if text in cmdline:
            found.append(cmdline)
    return found


def test_ctrl_c_in_convert_leaves_no_output_folder(slow_to_convert, tmp_path):
    out = tmp_path / "new-parent" / "converted"  # the missing parent must not be left behind either
    cli = CliProcess("convert", "--model", str(slow_to_convert), "--out", str(out))
    cli.wait_until(lambda: any(out.parent.glob(".converted.partial-*")))  # writing has begun
    assert_interrupted(*cli.interrupt())
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_in_convert_keeps_the_previous_conversion(slow_to_convert, tmp_path):
    out = tmp_path / "converted"
    out.mkdir()
    (out / "config.json").write_text('{"mapping": {"tp_size": 1, "pp_size": 1}}')
    (out / "rank0.safetensors").write_bytes(b"previous")
    cli = CliProcess("convert", "--model", str(slow_to_convert), "--out", str(out))
    cli.wait_until(lambda: any(tmp_path.glob(".converted.partial-*")))
    assert_interrupted(*cli.interrupt())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]
    assert (out / "rank0.safetensors").read_bytes() == b"previous"


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc to find the build worker")
def test_ctrl_c_in_build_stops_the_worker_and_leaves_no_engine(slow_to_convert, tmp_path):
    profile = tmp_path / "tiny.yaml"
    # bfloat16: the float32 source must be converted (one already in the profile's dtype is only linked)
    profile.write_text("backend: native\ndtype: bfloat16\nmax_seq_len: 64\nmax_input_len: 64\n")
    repo = tmp_path / "engines"
    cli = CliProcess("build", "--checkpoint", str(slow_to_convert), "--config", str(profile), "--repo", str(repo))
    cli.wait_until(lambda: any(repo.glob(".building-*")))  # the worker is writing the engine
    code, stderr = cli.interrupt()
    assert_interrupted(code, stderr)
    left = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    assert [p.name for p in repo.iterdir()] == [".checkpoint_hashes.json"], (left, stderr)  # no engine or temp
    assert processes_mentioning(str(repo)) == []  # the build worker is gone too


def test_ctrl_c_in_generate(tmp_path):
    from tests.conftest import make_hf_llama
    from tests.helpers_tokenizer import tiny_byte_level_tokenizer

    model_dir = tmp_path / "tiny"
    # eos_token_id outside the vocabulary: generation runs to --max-tokens, long enough to be interrupted.
    make_hf_llama(vocab_size=512, max_position_embeddings=4096, eos_token_id=600).save_pretrained(model_dir)
    tiny_byte_level_tokenizer().save_pretrained(model_dir)
    # --log-level after the subcommand: its INFO line "KV cache: ..." says the engine is loaded.
    cli = CliProcess("generate", "--model", str(model_dir), "--prompt", "hello", "--max-tokens", "4000",
                     "--num-blocks", "300", "--log-level", "INFO")
    cli.wait_until(lambda: any("KV cache" in line for line in cli.stderr_lines))
    assert_interrupted(*cli.interrupt())


def test_ctrl_c_turned_into_another_error_by_c_code_still_counts_as_interrupted():
    """torch reports a KeyboardInterrupt raised inside its callbacks as its own error; the CLI must
    still say "interrupted" (130), not "error:" (1). The recorder is what lets it know."""
    from llmserve.cli import _SigintRecorder

    recorder = _SigintRecorder()
    with recorder:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode boundary
        except KeyboardInterrupt:
            pass  # what a C library swallowing the interrupt would do
    assert recorder.received
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored on exit
