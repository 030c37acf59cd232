"""The one place engine tokens become client output: text deltas, stop strings, logprobs, finish reasons.

The server (through AsyncLLM), the offline API (through the synchronous Engine) and the TensorRT-LLM
adapter all feed it the core's per-step `EngineCoreOutputs` and get `RequestOutput`s back. A stop
string is only seen here, in the text: `process` names the requests it ended, so that the caller
tells the core to stop them too.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmserve.core.messages import EngineCoreOutput, EngineCoreOutputs, TokenLogprobs
from llmserve.core.sampled_token import SampledToken
from llmserve.frontend.detokenizer import IncrementalDetokenizer
from llmserve.frontend.engine_client import RequestOutput
from llmserve.sampling_params import SamplingParams


@dataclass(slots=True)
class _RequestState:
    num_prompt_tokens: int
    logprobs_on: bool
    detokenizer: IncrementalDetokenizer | None  # None: no tokenizer, token ids only
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_token_ids: list[int] | None = None  # kept only when the prompt is scored


class OutputProcessor:
    """Per-request detokenizers and counters; not thread-safe (one event loop or one thread drives it)."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self._requests: dict[str, _RequestState] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Start tracking a request the core is about to run."""
        assert request_id not in self._requests, f"request id {request_id!r} is already in use"
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
        self._requests[request_id] = _RequestState(
            len(prompt_token_ids), params.logprobs is not None, detokenizer,
            prompt_token_ids=list(prompt_token_ids) if params.prompt_logprobs is not None else None)

    def process(self, outputs: EngineCoreOutputs) -> tuple[list[RequestOutput], list[str]]:
        """The deltas of one core step, and the ids of requests a stop string ended (the core must abort them).

        Outputs of requests not tracked here (aborted meanwhile, or another client's) are skipped.
        """
        deltas, stopped = [], []
        for output in outputs.outputs:
            state = self._requests.get(output.request_id)
            if state is None:
                continue
            delta = self._process(state, output)
            if delta.finished:
                del self._requests[output.request_id]
                if output.finish_reason is None:  # the core would go on: a stop string ended it here
                    stopped.append(output.request_id)
            deltas.append(delta)
        return deltas, stopped

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop tracking a request; its final 'abort' delta, or None when it is unknown or already ended."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        return _delta(request_id, state, [], "", "abort", None)

    def _process(self, state: _RequestState, output: EngineCoreOutput) -> RequestOutput:
        state.num_output_tokens += len(output.new_token_ids)
        state.num_cached_tokens = output.num_cached_tokens
        finish_reason, stop_reason, text = output.finish_reason, output.stop_reason, ""
        detokenizer = state.detokenizer
        if detokenizer is not None:
            text = detokenizer.add_tokens(output.new_token_ids)
            if detokenizer.stop_reason is not None:
                finish_reason, stop_reason = "stop", detokenizer.stop_reason
            elif finish_reason is not None:
                text += detokenizer.finish()
        delta = _delta(output.request_id, state, _sampled_tokens(state, output), text, finish_reason, stop_reason)
        if output.prompt_logprobs is not None and state.prompt_token_ids is not None:
            delta.prompt_logprobs = [_sampled(token_id, lp)
                                     for token_id, lp in zip(state.prompt_token_ids[1:], output.prompt_logprobs)]
        return delta


def _sampled_tokens(state: _RequestState, output: EngineCoreOutput) -> list[SampledToken]:
    if state.logprobs_on and output.new_logprobs is not None:
        return [_sampled(token_id, lp) for token_id, lp in zip(output.new_token_ids, output.new_logprobs)]
    return [SampledToken(token_id) for token_id in output.new_token_ids]


def _sampled(token_id: int, logprobs: TokenLogprobs) -> SampledToken:
    return SampledToken(token_id, logprobs.logprob, [(int(i), float(p)) for i, p in logprobs.top], logprobs.rank)


def _delta(request_id: str, state: _RequestState, tokens: list[SampledToken], text: str,
           finish_reason: str | None, stop_reason: str | int | None) -> RequestOutput:
    return RequestOutput(
        request_id=request_id, new_token_ids=[t.token_id for t in tokens], new_text=text,
        finished=finish_reason is not None, finish_reason=finish_reason, stop_reason=stop_reason,
        num_prompt_tokens=state.num_prompt_tokens, num_output_tokens=state.num_output_tokens,
        num_cached_tokens=state.num_cached_tokens, new_logprobs=tokens if state.logprobs_on else None)
