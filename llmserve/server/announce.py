"""What the operator sees at the default log level: the start-up banner, builds ending, shutdown steps.

All of it goes to the `llmserve.announce` logger, which `llmserve serve` shows at INFO even though
everything else is quiet below WARNING (as the access log is).
"""

from __future__ import annotations

import logging

from llmserve.core.messages import ModelInfo
from llmserve.server.config import ServerConfig
from llmserve.server.models import DEFAULT_ALIAS, READY, ModelRegistry, ServedModel

announce = logging.getLogger("llmserve.announce")


def client_url(host: str, port: int) -> str:
    """The base URL an OpenAI client on this machine uses (a wildcard host is reached via loopback)."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/v1"


def banner_lines(config: ServerConfig, models: ModelRegistry, port: int) -> list[str]:
    """A few lines: where clients connect, then each model with its name, device and KV capacity."""
    url = client_url(config.host, port)
    where = "all interfaces" if config.host in ("", "0.0.0.0", "::") else config.host
    lines = [f"llmserve is serving on {where}, port {port}: clients use base_url {url} (Ctrl-C stops)"]
    for index, model in enumerate(models):
        lines.extend(_model_lines(model, is_default=index == 0))
        lines.extend(_defaults_line(model, config.generation_config))
    if config.default_max_tokens is not None:
        lines.append(f"requests that set no max_tokens get {config.default_max_tokens} (--default-max-tokens)")
    return lines


def _defaults_line(model: ServedModel, generation_config: str) -> list[str]:
    """Which sampling defaults the model's requests get when they omit a field."""
    if model.status != READY:
        return []
    if generation_config == "none" or not model.sampling_defaults:
        why = "--generation-config none" if generation_config == "none" else "its generation_config.json sets none"
        return [f"model {model.name!r}: sampling defaults of the OpenAI API ({why})"]
    fields = ", ".join(f"{name}={value}" for name, value in model.sampling_defaults.items())
    return [f"model {model.name!r}: sampling defaults from its generation_config.json: {fields} "
            f"(for fields a request omits; --generation-config none turns them off)"]


def _model_lines(model: ServedModel, is_default: bool) -> list[str]:
    alias = f" (also {DEFAULT_ALIAS!r})" if is_default and model.name != DEFAULT_ALIAS else ""
    title = f"model {model.name!r}{alias}"
    if model.status != READY:
        return [f"{title}: building in the background; requests for it get 503 until it is ready"]
    info = model.engine.info
    lines = [f"{title}: {_device_summary(info)}"]
    if info.num_kv_blocks:  # an engine that manages its own KV cache (TensorRT-LLM) does not say
        lines.append(f"model {model.name!r}: {_capacity_summary(info)}")
    return lines


def _device_summary(info: ModelInfo) -> str:
    return (f"device {info.device}, dtype {info.dtype}, quantization {info.quantization or 'none'}, "
            f"KV cache dtype {info.kv_cache_dtype}")


def _capacity_summary(info: ModelInfo) -> str:
    num_kv_tokens = info.num_kv_blocks * info.block_size
    return (f"KV cache {info.num_kv_blocks} blocks x {info.block_size} tokens = {num_kv_tokens} tokens; "
            f"max_model_len {info.max_model_len}, so {num_kv_tokens // info.max_model_len} sequences fit at full "
            f"context (max_num_seqs {info.max_num_seqs})")
