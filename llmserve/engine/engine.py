"""The synchronous in-process engine: an EngineCore plus per-request detokenizers, one step at a time.

`step()` returns text deltas (RequestOutput) for the offline `LLM` API and the tests; the core
itself only deals in token ids. A stop string seen in the text ends the request in the core.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from llmserve.checkpoint.model_config import ModelConfig
from llmserve.config import EngineConfig
from llmserve.core.messages import EngineCoreOutput, EngineCoreRequest
from llmserve.engine.engine_core import EngineCore
from llmserve.frontend.detokenizer import IncrementalDetokenizer
from llmserve.frontend.engine_client import RequestOutput
from llmserve.sampling_params import SamplingParams
from llmserve.worker.model_runner import SampledToken

logger = logging.getLogger(__name__)

__all__ = ["Engine", "RequestOutput", "load_tokenizer"]


@dataclass(slots=True)
class _Request:
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0


class Engine:
    """EngineCore plus detokenization; not thread-safe."""

    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, config: EngineConfig,
                 tokenizer=None, num_blocks: int | None = None, tokenizer_path: str | None = None):
        self.core = EngineCore(model, model_config, config, num_blocks, tokenizer_path)
        self.tokenizer = tokenizer
        self.requests: dict[str, _Request] = {}

    @classmethod
    def from_config(cls, config: EngineConfig, progress=print) -> "Engine":
        """Resolve the model (pulling the default one if needed), load it and its tokenizer."""
        from llmserve.checkpoint.pull import resolve_model
        from llmserve.models.loader import load_model

        path = resolve_model(config.model, progress=progress)
        torch.manual_seed(config.seed)
        model_config, model = load_model(path, config.device.device, config.device.dtype,
                                         config.device.quantization)
        return cls(model, model_config, config, tokenizer=load_tokenizer(path), tokenizer_path=str(path))

    # the core's parts, for the server's limits and white-box tests
    model_config = property(lambda self: self.core.model_config)
    config = property(lambda self: self.core.config)
    max_model_len = property(lambda self: self.core.max_model_len)
    kv = property(lambda self: self.core.kv)
    scheduler = property(lambda self: self.core.scheduler)
    runner = property(lambda self: self.core.runner)
    async_scheduling = property(lambda self: self.core.async_scheduling)
    num_prompt_tokens_total = property(lambda self: self.core.num_prompt_tokens_total)
    num_generation_tokens_total = property(lambda self: self.core.num_generation_tokens_total)

    # ---- requests -------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError when the request can never run (empty or too long a prompt)."""
        self.core.check_request(prompt_token_ids, params)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.core.add_request(EngineCoreRequest(request_id, list(prompt_token_ids), params))
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
        self.requests[request_id] = _Request(list(prompt_token_ids), params, detok)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now and free its blocks; None if it is unknown or already ended."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.core.abort_requests([request_id])
        return self._delta(request_id, request, [], "", "abort", None)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    # ---- the step -----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one core step; a text delta for every request that progressed."""
        outputs = []
        for output in self.core.step().outputs:
            request = self.requests.get(output.request_id)
            if request is not None:
                outputs.append(self._process(request, output))
        return outputs

    def _process(self, request: _Request, output: EngineCoreOutput) -> RequestOutput:
        request.num_output_tokens += len(output.new_token_ids)
        request.num_cached_tokens = output.num_cached_tokens
        finish_reason, stop_reason, text = output.finish_reason, output.stop_reason, ""
        detok = request.detokenizer
        if detok is not None:
            text = detok.add_tokens(output.new_token_ids)
            if detok.stop_reason is not None:
                if finish_reason is None:  # the core would go on: end it there
                    self.core.abort_requests([output.request_id])
                finish_reason, stop_reason = "stop", detok.stop_reason
            elif finish_reason is not None:
                text += detok.finish()
        if finish_reason is not None:
            del self.requests[output.request_id]
        tokens = [SampledToken(t) for t in output.new_token_ids]
        if output.new_logprobs is not None:
            tokens = [SampledToken(t, lp.logprob, [tuple(x) for x in lp.top])
                      for t, lp in zip(output.new_token_ids, output.new_logprobs)]
        return self._delta(output.request_id, request, tokens, text, finish_reason, stop_reason)

    @staticmethod
    def _delta(request_id: str, request: _Request, tokens: list[SampledToken], text: str,
               finish_reason: str | None, stop_reason) -> RequestOutput:
        return RequestOutput(
            request_id=request_id, new_token_ids=[t.token_id for t in tokens], new_text=text,
            finished=finish_reason is not None, finish_reason=finish_reason, stop_reason=stop_reason,
            num_prompt_tokens=len(request.prompt_token_ids), num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens,
            new_logprobs=tokens if request.params.logprobs is not None else None)


def load_tokenizer(path: str | Path):
    """The HF tokenizer saved beside the checkpoint, or None when there is none."""
    path = Path(path)
    if not any(path.glob("tokenizer*")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
