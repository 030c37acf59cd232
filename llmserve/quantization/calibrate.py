"""Calibration: what each linear layer's input looks like on real text, measured by this runtime.

The model runs (through the engine, as served: prefill only) over calibration samples while
forward pre-hooks record the largest magnitude each linear layer's input reaches, per input
channel. Samples: ShareGPT's calibration part (every record `evaluate.perplexity` does not hold
out) or a JSON-lines file of `{"text": ...}` records.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from llmserve.evaluate.perplexity import MIN_TOKENS, exchange_texts, token_samples
from llmserve.quantization.native import NATIVE_LINEARS

BATCH = 8  # samples per engine call (the progress bar's step)


@dataclass(frozen=True, slots=True)
class CalibrationConfig:
    dataset: str = "sharegpt"  # or "jsonl:PATH"
    size: int = 128  # samples
    seq_len: int = 512  # tokens per sample, at most
    device: str | None = None  # None: CUDA when available, else CPU

    def __post_init__(self) -> None:
        if self.size < 1 or self.seq_len < MIN_TOKENS:
            raise ValueError(f"--calib-size must be >= 1 and --calib-seq-len >= {MIN_TOKENS}")
        if self.dataset != "sharegpt" and not self.dataset.startswith("jsonl:"):
            raise ValueError(f"--calib-dataset must be sharegpt or jsonl:PATH, got {self.dataset!r}")


def calibration_texts(config: CalibrationConfig, tokenizer) -> list[list[int]]:
    """Token ids of `config.size` samples of at least MIN_TOKENS tokens, each cut to `config.seq_len`."""
    if config.dataset == "sharegpt":
        from llmserve.bench.sharegpt import load_conversations

        texts = exchange_texts(load_conversations(), held_out=False)
    else:
        texts = _jsonl_texts(Path(config.dataset.removeprefix("jsonl:")))
    samples = token_samples(texts, tokenizer, config.size, config.seq_len)
    if not samples:
        raise ValueError(f"no calibration sample of at least {MIN_TOKENS} tokens in {config.dataset}")
    return samples


def _jsonl_texts(path: Path):
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
            text = record.get("text") if isinstance(record, dict) else record
            if not isinstance(text, str):
                raise ValueError(f'{path}:{number}: expected {{"text": "..."}} or a JSON string')
            yield text


@contextmanager
def recording_input_amax(model: torch.nn.Module):
    """While inside, record per input channel the largest |input| of each calibrated linear of `model`
    (eager forward passes only: a CUDA graph replay runs no hooks); yields the dict, filled in place."""
    amax: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, inputs):
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(dim=0).float()
            amax[name] = x if name not in amax else torch.maximum(amax[name], x)
        return hook

    hooks = [module.register_forward_pre_hook(record(name)) for name, module in model.named_modules()
             if name.endswith(NATIVE_LINEARS)]
    try:
        yield amax
    finally:
        for hook in hooks:
            hook.remove()


def run_samples(llm, texts: list[list[int]], progress: bool = True) -> None:
    """Prefill every sample (one token generated), with a progress bar."""
    from llmserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1)
    with tqdm(total=len(texts), desc="calibrating", unit="sample", disable=not progress) as bar:
        for start in range(0, len(texts), BATCH):
            llm.generate(texts[start:start + BATCH], params)
            bar.update(len(texts[start:start + BATCH]))


def input_amax(model_dir: str | Path, config: CalibrationConfig, progress: bool = True) -> dict[str, torch.Tensor]:
    """Per input channel, the largest |input| of each calibrated linear over the samples, by module name
    (`transformer.layers.{i}.attention.qkv`, ...), float32 on the CPU."""
    from llmserve.llm import LLM

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    with LLM(str(model_dir), device=device, dtype=dtype, max_model_len=max(config.seq_len + 1, 64),
             enable_prefix_caching=False) as llm:
        texts = calibration_texts(config, llm.tokenizer)
        with recording_input_amax(llm.engine.core.runner.model) as amax:
            run_samples(llm, texts, progress)
    return {name: value.cpu() for name, value in amax.items()}
