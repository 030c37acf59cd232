"""Pure translations between llmserve's types and TensorRT-LLM Executor's (no tensorrt_llm import).

Field names and semantics checked against NVIDIA/TensorRT-LLM sources; see `llmserve/backends/trtllm.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmserve.core.messages import EngineCoreOutput, ModelInfo
from llmserve.frontend.async_llm import ERROR
from llmserve.sampling_params import SamplingParams

# TensorRT-LLM FinishReason names -> our finish_reason strings (vLLM vocabulary).
FINISH_REASONS = {"END_ID": "stop", "STOP_WORDS": "stop", "LENGTH": "length", "TIMED_OUT": "abort",
                  "CANCELLED": "abort"}


def sampling_config_kwargs(params: SamplingParams) -> dict:
    """Keyword arguments of TensorRT-LLM's SamplingConfig for `params` (neutral values left unset)."""
    kwargs: dict = {"beam_width": 1}
    if params.greedy:
        kwargs["top_k"] = 1  # temperature unset: greedy ignores it
    else:
        # top_p must be sent even at 1.0: top_k=0 with top_p unset (0) would mean greedy.
        kwargs.update(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
        if params.min_p > 0.0:
            kwargs["min_p"] = params.min_p
    if params.seed is not None:
        kwargs["seed"] = params.seed % (1 << 64)  # RandomSeedType is uint64
    if params.min_tokens:
        kwargs["min_tokens"] = params.min_tokens
    if params.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = params.repetition_penalty
    if params.presence_penalty != 0.0:
        kwargs["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty != 0.0:
        kwargs["frequency_penalty"] = params.frequency_penalty
    return kwargs


def request_kwargs(prompt_token_ids: list[int], params: SamplingParams, eos_token_ids: list[int],
                   max_seq_len: int) -> dict:
    """Keyword arguments of TensorRT-LLM's Request (all but sampling_config) for a streaming request."""
    if params.logit_bias:
        raise ValueError("logit_bias is not supported with the TensorRT-LLM backend yet")
    if params.structured_outputs is not None:
        raise ValueError("structured outputs (response_format, guided decoding, forced tool calls) are not "
                         "supported with the TensorRT-LLM backend yet")
    max_tokens = params.max_tokens or max(1, max_seq_len - len(prompt_token_ids))
    end_id = eos_token_ids[0] if eos_token_ids else -1
    stop_ids = list(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids += [t for t in eos_token_ids[1:] if t not in stop_ids]  # end_id takes one id only
    return {"input_token_ids": list(prompt_token_ids), "max_tokens": max_tokens, "streaming": True,
            "end_id": -1 if params.ignore_eos else end_id,  # -1 never matches: generation runs to max_tokens
            "pad_id": end_id, "stop_words": [[t] for t in stop_ids] or None}


def engine_info(engine_dir: str | Path) -> tuple[list[int], int]:
    """(end-of-sequence ids, max_seq_len) of a trtllm-build output folder.

    trtllm-build writes config.json = {version, pretrained_config, build_config}; our converter's
    eos_token_id rides in pretrained_config (TensorRT-LLM keeps unknown fields — an assumption, not run),
    with generation_config.json (copied beside the engine by our build) as the fallback.
    """
    engine_dir = Path(engine_dir)
    raw = json.loads((engine_dir / "config.json").read_text()) if (engine_dir / "config.json").is_file() else {}
    eos = raw.get("pretrained_config", {}).get("eos_token_id")
    if eos is None and (engine_dir / "generation_config.json").is_file():
        eos = json.loads((engine_dir / "generation_config.json").read_text()).get("eos_token_id")
    eos_ids = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
    return eos_ids, int(raw.get("build_config", {}).get("max_seq_len", 8192))


def model_info(engine_dir: str | Path) -> ModelInfo:
    """What the API side needs to know of a trtllm-build output folder (limits, banner, tokenizer folder).

    TensorRT-LLM manages its own KV cache, so the block counts stay 0 (the banner then leaves them out).
    """
    engine_dir = Path(engine_dir)
    raw = json.loads((engine_dir / "config.json").read_text()) if (engine_dir / "config.json").is_file() else {}
    pretrained, build = raw.get("pretrained_config", {}), raw.get("build_config", {})
    if "vocab_size" not in pretrained:
        raise ValueError(f"{engine_dir / 'config.json'} has no pretrained_config.vocab_size; is it a trtllm-build "
                         f"output folder?")
    eos_ids, max_seq_len = engine_info(engine_dir)
    dtype = str(pretrained.get("dtype", "unknown"))
    return ModelInfo(vocab_size=int(pretrained["vocab_size"]), max_model_len=max_seq_len, eos_token_ids=eos_ids,
                     device="cuda", dtype=dtype, quantization=(pretrained.get("quantization") or {}).get("quant_algo"),
                     kv_cache_dtype=dtype, num_kv_blocks=0, block_size=0,
                     max_num_seqs=int(build.get("max_batch_size", 0)), tokenizer_path=str(engine_dir))


def core_output(request_id: str, response, stop_token_ids: set[int]) -> EngineCoreOutput:
    """The core output carried by one streaming Executor response (new tokens only).

    An error response ends the request with finish reason 'error' (its message goes to the log).
    """
    if response.has_error():
        return EngineCoreOutput(request_id, [], finish_reason=ERROR)
    result = response.result
    new_ids = [int(t) for t in result.output_token_ids[0]]  # beam 0; streaming results hold only new tokens
    if not result.is_final:
        return EngineCoreOutput(request_id, new_ids)
    stop_reason = new_ids[-1] if new_ids and new_ids[-1] in stop_token_ids else None
    return EngineCoreOutput(request_id, new_ids, finish_reason=_finish_reason(result), stop_reason=stop_reason)


def _finish_reason(result) -> str:
    reasons = list(getattr(result, "finish_reasons", []) or [])
    name = getattr(reasons[0], "name", str(reasons[0])) if reasons else "END_ID"
    return FINISH_REASONS.get(name.rsplit(".", 1)[-1], "stop")
