"""Offline Python API in the shape vLLM users know: `LLM(model).generate(prompts, params)`."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmserve.config import CacheConfig, DeviceConfig, EngineConfig, ParallelConfig, SchedulerConfig
from llmserve.frontend.chat_template import encode_chat
from llmserve.engine.engine import Engine
from llmserve.core.sampled_token import SampledToken
from llmserve.sampling_params import SamplingParams


@dataclass(slots=True)
class CompletionOutput:
    """One of the `n` completions of a prompt."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[SampledToken] | None = None


@dataclass(slots=True)
class GenerationResult:
    """A prompt and its completions."""

    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    # SamplingParams(prompt_logprobs=k): None for the first prompt token, then each token's logprobs
    prompt_logprobs: list[SampledToken | None] | None = None


class LLM:
    """Loads a model once and generates for batches of prompts with in-flight batching."""

    def __init__(self, model: str = "default", *, device: str = "cpu", dtype: str = "float32",
                 block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_memory_bytes: int | None = None, max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 64, max_model_len: int = 8192, enable_prefix_caching: bool = True,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 seed: int = 0, engine: Engine | None = None):
        self.engine = engine or Engine.from_config(EngineConfig(
            model=model, seed=seed,
            parallel=ParallelConfig(tensor_parallel_size, pipeline_parallel_size),
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                              kv_cache_memory_bytes=kv_cache_memory_bytes,
                              enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                      max_num_seqs=max_num_seqs, max_model_len=max_model_len),
            device=DeviceConfig(device=device, dtype=dtype)))
        self._next_id = 0

    def shutdown(self) -> None:
        """Stop the worker processes of a parallel engine (tp or pp > 1); the object is unusable after."""
        self.engine.core.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[GenerationResult]:
        """Complete each prompt (text, or a list of token ids); results keep prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        assert len(params_list) == len(prompts), "one SamplingParams per prompt, or one for all"
        results = [self._add(prompt, p) for prompt, p in zip(prompts, params_list)]
        self._run_to_completion(results)
        return [result for result, _ in results]

    def chat(self, messages, sampling_params: SamplingParams | None = None) -> list[GenerationResult]:
        """Apply the tokenizer's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(conversation) for conversation in conversations]
        return self.generate(prompts, sampling_params)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """The conversation's prompt ids; special-token text inside a message stays plain text."""
        return encode_chat(self.tokenizer, messages)

    def _add(self, prompt, params: SamplingParams):
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        result = GenerationResult(text, token_ids, [CompletionOutput(i) for i in range(params.n)])
        ids = {}
        for i in range(params.n):
            request_id = f"llm-{self._next_id}"
            self._next_id += 1
            self.engine.add_request(request_id, token_ids, params.for_choice(i))
            ids[request_id] = result.outputs[i]
        return result, ids

    def _run_to_completion(self, results) -> None:
        by_id = {rid: (result, out) for result, ids in results for rid, out in ids.items()}
        while self.engine.has_unfinished_requests():
            for delta in self.engine.step():
                result, out = by_id[delta.request_id]
                out.text += delta.new_text
                out.token_ids.extend(delta.new_token_ids)
                if delta.new_logprobs is not None:
                    out.logprobs = (out.logprobs or []) + delta.new_logprobs
                result.num_cached_tokens = delta.num_cached_tokens
                if delta.prompt_logprobs is not None:
                    result.prompt_logprobs = [None, *delta.prompt_logprobs]
                if delta.finished:
                    out.finish_reason, out.stop_reason = delta.finish_reason, delta.stop_reason

