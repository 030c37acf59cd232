"""The synchronous in-process engine: an EngineCore plus the OutputProcessor, one step at a time.

`step()` returns text deltas (RequestOutput) for the offline `LLM` API, benchmarks and the tests;
the core itself only deals in token ids. A stop string seen in the text ends the request in the core.
"""

from __future__ import annotations

import logging

import torch

from llmserve.checkpoint.model_config import ModelConfig
from llmserve.config import EngineConfig
from llmserve.core.messages import EngineCoreRequest
from llmserve.engine.engine_core import EngineCore
from llmserve.frontend.engine_client import RequestOutput
from llmserve.frontend.output_processor import OutputProcessor
from llmserve.frontend.tokenizer import load_tokenizer
from llmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["Engine", "RequestOutput", "load_tokenizer"]


class Engine:
    """EngineCore plus output processing, stepped by the caller; not thread-safe."""

    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, config: EngineConfig,
                 tokenizer=None, num_blocks: int | None = None, tokenizer_path: str | None = None):
        self.core = EngineCore(model, model_config, config, num_blocks, tokenizer_path)
        self.tokenizer = tokenizer
        self.processor = OutputProcessor(tokenizer)

    @classmethod
    def from_config(cls, config: EngineConfig, progress=print) -> "Engine":
        """Resolve the model (pulling the default one if needed), load it and its tokenizer."""
        core = EngineCore.from_config(config, progress=progress)
        return cls.from_core(core, load_tokenizer(core.info.tokenizer_path))

    @classmethod
    def from_core(cls, core: EngineCore, tokenizer=None) -> "Engine":
        """An Engine over an already loaded core."""
        engine = cls.__new__(cls)
        engine.core, engine.tokenizer, engine.processor = core, tokenizer, OutputProcessor(tokenizer)
        return engine

    # the core's parts, for white-box tests and benchmarks
    info = property(lambda self: self.core.info)
    model_config = property(lambda self: self.core.model_config)
    config = property(lambda self: self.core.config)
    max_model_len = property(lambda self: self.core.max_model_len)
    kv = property(lambda self: self.core.kv)
    scheduler = property(lambda self: self.core.scheduler)
    runner = property(lambda self: self.core.runner)
    async_scheduling = property(lambda self: self.core.async_scheduling)
    num_prompt_tokens_total = property(lambda self: self.core.num_prompt_tokens_total)
    num_generation_tokens_total = property(lambda self: self.core.num_generation_tokens_total)

    @property
    def requests(self):
        """The requests whose output is still being processed (not finished, not aborted)."""
        return self.processor

    # ---- requests -------------------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError when the request can never run (empty or too long a prompt)."""
        self.core.check_request(prompt_token_ids, params)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.core.add_request(EngineCoreRequest(request_id, list(prompt_token_ids), params))
        self.processor.add_request(request_id, prompt_token_ids, params)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now and free its blocks; its final delta, or None if it is unknown or already ended."""
        final = self.processor.abort(request_id)
        if final is not None:
            self.core.abort_requests([request_id])
        return final

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one core step; a text delta for every request that progressed."""
        deltas, stopped = self.processor.process(self.core.step())
        if stopped:
            self.core.abort_requests(stopped)
        return deltas
