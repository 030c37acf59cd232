"""What the operator sees at the default log level: the start-up banner, builds ending, shutdown steps.

All of it goes to the `llmserve.announce` logger, which `llmserve serve` shows at INFO even though
everything else is quiet below WARNING (as the access log is).
"""

from __future__ import annotations

import logging

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
    return lines


def _model_lines(model: ServedModel, is_default: bool) -> list[str]:
    alias = f" (also {DEFAULT_ALIAS!r})" if is_default and model.name != DEFAULT_ALIAS else ""
    title = f"model {model.name!r}{alias}"
    if model.status != READY:
        return [f"{title}: building in the background; requests for it get 503 until it is ready"]
    core = getattr(model.engine, "engine", None)
    if core is None or not hasattr(core, "kv"):
        return [f"{title}: {type(model.engine).__name__}"]
    return [f"{title}: {_device_summary(core)}", f"model {model.name!r}: {_capacity_summary(core)}"]


def _device_summary(core) -> str:
    device = core.config.device
    kv_dtype = core.config.cache.kv_cache_dtype
    return (f"device {device.device}, dtype {device.dtype}, quantization {device.quantization or 'none'}, "
            f"KV cache dtype {device.dtype if kv_dtype == 'auto' else kv_dtype}")


def _capacity_summary(core) -> str:
    block_size = core.config.cache.block_size
    num_kv_tokens = core.kv.num_blocks * block_size
    max_model_len = core.max_model_len
    return (f"KV cache {core.kv.num_blocks} blocks x {block_size} tokens = {num_kv_tokens} tokens; "
            f"max_model_len {max_model_len}, so {num_kv_tokens // max_model_len} sequences fit at full context "
            f"(max_num_seqs {core.config.scheduler.max_num_seqs})")
