"""The synchronous engine: requests in, one step at a time (schedule -> execute -> update)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmserve.checkpoint.model_config import ModelConfig
from llmserve.config import EngineConfig
from llmserve.engine.detokenizer import IncrementalDetokenizer
from llmserve.engine.kv_cache import KVCacheManager
from llmserve.engine.model_runner import (LaunchedStep, ModelRunner, SampledToken, kv_bytes_per_block,
                                          kv_cache_dtype)
from llmserve.engine.scheduler import Scheduler
from llmserve.engine.sequence import FinishReason, Sequence
from llmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request: a delta, plus totals so far."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    new_logprobs: list[SampledToken] | None = None


@dataclass(slots=True)
class _Request:
    seq: Sequence
    detokenizer: IncrementalDetokenizer | None
    pending_tokens: list[SampledToken] = field(default_factory=list)


class Engine:
    """Owns scheduler, KV cache manager and model runner; not thread-safe."""

    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, config: EngineConfig,
                 tokenizer=None, num_blocks: int | None = None):
        self.model_config = model_config
        self.config = config
        self.tokenizer = tokenizer
        num_blocks = num_blocks or self._num_blocks_from_budget(model)
        self.kv = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.max_model_len = min(config.scheduler.max_model_len, model_config.max_position_embeddings,
                                 num_blocks * config.cache.block_size)
        self.runner = ModelRunner(model, model_config, config.cache, config.device, num_blocks,
                                  self.max_model_len, config.scheduler.max_num_seqs)
        self.scheduler = Scheduler(config.scheduler, self.kv, model_config.eos_token_id)
        async_scheduling = config.scheduler.async_scheduling
        self.async_scheduling = self.runner.device.type == "cuda" if async_scheduling is None else async_scheduling
        self._in_flight: tuple[LaunchedStep, list] | None = None
        self.requests: dict[str, _Request] = {}
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        logger.info("KV cache: %d blocks of %d tokens (max %d tokens); max_model_len %d",
                    num_blocks, config.cache.block_size, num_blocks * config.cache.block_size, self.max_model_len)

    @classmethod
    def from_config(cls, config: EngineConfig, progress=print) -> "Engine":
        """Resolve the model (pulling the default one if needed), load it and its tokenizer."""
        from llmserve.checkpoint.pull import resolve_model
        from llmserve.models.loader import load_model

        path = resolve_model(config.model, progress=progress)
        torch.manual_seed(config.seed)
        model_config, model = load_model(path, config.device.device, config.device.dtype,
                                         config.device.quantization)
        return cls(model, model_config, config, tokenizer=load_tokenizer(path))

    def _num_blocks_from_budget(self, model) -> int:
        cache = self.config.cache
        if cache.num_blocks:
            return cache.num_blocks
        per_block = kv_bytes_per_block(self.model_config, cache.block_size, kv_cache_dtype(cache, self.config.device))
        budget = cache.kv_cache_memory_bytes or self._default_kv_budget(model)
        return max(budget // per_block, 1)

    def _default_kv_budget(self, model) -> int:
        if not self.config.device.device.startswith("cuda"):
            return DEFAULT_CPU_KV_BYTES
        from llmserve.engine.profiling import cuda_kv_budget

        return cuda_kv_budget(model, self.model_config, self.config)

    # ---- requests -------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError when the request can never run (empty or too long a prompt)."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        bad_stops = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad_stops:
            raise ValueError(f"stop_token_ids must be in [0, {vocab}), got {bad_stops}")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens, but this model's context length is "
                f"{self.max_model_len} (prompt plus at least one generated token)")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.check_request(prompt_token_ids, params)
        room = self.max_model_len - len(prompt_token_ids)
        seq = Sequence(request_id, list(prompt_token_ids), params,
                       max_output_tokens=min(params.max_tokens or room, room))
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(
                self.tokenizer, seq.prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
        self.scheduler.add(seq)
        self.requests[request_id] = _Request(seq, detok)
        self.num_prompt_tokens_total += len(prompt_token_ids)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now and free its blocks; None if it is unknown or already ended."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.finish(request.seq, FinishReason.ABORT)
        return self._output(request, [], "")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ---- the step -----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns a delta for every request that progressed.

        With async scheduling the deltas are those of the previous step: this step is
        queued on the device first, so the host's work overlaps the device's.
        """
        if self.async_scheduling:
            return self._step_overlapped()
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        sampled = self.runner.execute(out)
        self.scheduler.update(out, [s.token_id for s in sampled])
        return self._outputs(out, sampled)

    def _step_overlapped(self) -> list[RequestOutput]:
        if self._in_flight is not None and self._needs_output_ids():
            return self._finish_in_flight()  # penalties read the previous ids: no overlap
        out = self.scheduler.schedule()
        if out.is_empty:
            return self._finish_in_flight()
        previous = self._in_flight[0] if self._in_flight is not None else None
        launched = self.runner.launch(out, previous)
        pending = self.scheduler.advance(out)
        outputs = self._finish_in_flight()  # waits for the previous step while this one runs
        self._in_flight = (launched, pending)
        return outputs

    def _finish_in_flight(self) -> list[RequestOutput]:
        if self._in_flight is None:
            return []
        (launched, pending), self._in_flight = self._in_flight, None
        sampled = self.runner.collect(launched)
        self.scheduler.resolve(launched.out, pending, [s.token_id for s in sampled])
        return self._outputs(launched.out, sampled)

    def _needs_output_ids(self) -> bool:
        return any(seq.params.uses_output_ids for seq in self.scheduler.running)

    def _outputs(self, out, sampled: list[SampledToken]) -> list[RequestOutput]:
        samples = iter(sampled)
        outputs = []
        for i, seq in enumerate(out.seqs):
            if not out.samples(i):
                continue
            token = next(samples)
            request = self.requests.get(seq.request_id)
            if request is not None and request.seq is seq:  # not ended while the step ran
                outputs.append(self._process_token(request, token))
        return outputs

    def _process_token(self, request: _Request, token: SampledToken) -> RequestOutput:
        seq = request.seq
        self.num_generation_tokens_total += 1
        text = ""
        if request.detokenizer is not None:
            text = request.detokenizer.add_tokens([token.token_id])
            if request.detokenizer.stop_reason is not None and not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.STOP)
            elif seq.is_finished:
                text += request.detokenizer.finish()
        if seq.is_finished:
            del self.requests[seq.request_id]
        return self._output(request, [token], text)

    def _output(self, request: _Request, tokens: list[SampledToken], text: str) -> RequestOutput:
        seq = request.seq
        stop_reason = None
        if request.detokenizer is not None and request.detokenizer.stop_reason is not None:
            stop_reason = request.detokenizer.stop_reason
        elif seq.finish_reason is FinishReason.STOP and seq.output_token_ids:
            stop_reason = seq.output_token_ids[-1]
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[t.token_id for t in tokens],
            new_text=text,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            stop_reason=stop_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            new_logprobs=tokens if seq.params.logprobs is not None else None,
        )


def load_tokenizer(path: str | Path):
    """The HF tokenizer saved beside the checkpoint, or None when there is none."""
    path = Path(path)
    if not any(path.glob("tokenizer*")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)

