"""How `serve` reaches an engine: the one function that makes the EngineClient of an EngineConfig."""

from __future__ import annotations

import dataclasses

from llmserve.config import EngineConfig
from llmserve.frontend.engine_client import EngineClient


def make_engine_client(config: EngineConfig, progress=print, core_address: str | None = None) -> EngineClient:
    """The engine client serving `config` (not started). By default its engine core runs in a process of
    its own, spawned by `start()` (or, with `core_address`, one a supervisor started); with
    `config.engine_in_process` the core runs in this process, loaded now."""
    from llmserve.frontend.async_llm import AsyncLLM
    from llmserve.frontend.tokenizer import load_tokenizer

    if config.engine_in_process:
        from llmserve.frontend.inproc_core_client import InprocCoreClient

        core = InprocCoreClient.from_config(config, progress=progress)
        return AsyncLLM(core, load_tokenizer(core.info.tokenizer_path))
    from llmserve.checkpoint.pull import resolve_model
    from llmserve.frontend.mp_core_client import MPCoreClient

    path = resolve_model(config.model, progress=progress)  # the default model is pulled here, once
    if core_address is not None:
        return AsyncLLM(MPCoreClient(address=core_address), load_tokenizer(path))
    return AsyncLLM(MPCoreClient(dataclasses.replace(config, model=str(path))), load_tokenizer(path))
