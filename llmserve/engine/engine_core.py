"""The engine core: scheduler, KV block pool and model runner, one step at a time, token ids only.

Requests come in as `EngineCoreRequest`s and leave as `EngineCoreOutputs` (one per step, every
request's new token ids and finish reasons); no text, no tokenizer. The same object runs inside
the API process (the offline `LLM`, tests) and alone in the engine-core process.
"""

from __future__ import annotations

import atexit
import logging
import time
from collections import deque

import torch

from llmserve.checkpoint.model_config import ModelConfig
from llmserve.config import EngineConfig
from llmserve.core.kv_cache import KVCacheManager
from llmserve.core.messages import (EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, ModelInfo,
                                    SchedulerStats)
from llmserve.core.scheduler import AdvancedStep, Scheduler
from llmserve.core.scheduler_output import ModelRunnerOutput
from llmserve.core.request_check import check_request
from llmserve.core.sequence import FinishReason, Sequence, SequenceStatus
from llmserve.grammar.compiler import GrammarCompiler
from llmserve.grammar.matchers import GrammarMatchers
from llmserve.sampling_params import SamplingParams
from llmserve.worker.model_runner import LaunchedStep, ModelRunner, kv_cache_dtype
from llmserve.worker.profiling import num_kv_blocks

logger = logging.getLogger(__name__)


class EngineCore:
    """Owns scheduler, KV cache manager and model runner; not thread-safe."""

    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, config: EngineConfig,
                 num_blocks: int | None = None, tokenizer_path: str | None = None, ranks=None):
        """`ranks` (worker/parallel_runner.Ranks): rank 0 of a tp x pp engine, `model` its part."""
        self.model_config = model_config
        self.config = config
        self.ranks = ranks
        if ranks is None:
            num_blocks = num_blocks or num_kv_blocks(model, model_config, config)
        else:
            from llmserve.worker.parallel_runner import kv_blocks_for_rank

            num_blocks = num_blocks or kv_blocks_for_rank(model, ranks.local_config(), config, ranks.parallel)
        self.kv = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.max_model_len = min(config.scheduler.max_model_len, model_config.max_position_embeddings,
                                 num_blocks * config.cache.block_size)
        if ranks is None:
            self.runner = ModelRunner(model, model_config, config.cache, config.device, num_blocks,
                                      self.max_model_len, config.scheduler.max_num_seqs)
        else:
            from llmserve.worker.parallel_runner import ParallelModelRunner

            self.runner = ParallelModelRunner(model, ranks.local_config(), config, num_blocks, ranks.parallel,
                                              describe_ranks=ranks.describe)
        self.scheduler = Scheduler(config.scheduler, self.kv, model_config.eos_token_id)
        self.grammars = GrammarMatchers(GrammarCompiler.for_path(tokenizer_path, model_config.vocab_size,
                                                                 model_config.eos_token_id))
        async_scheduling = config.scheduler.async_scheduling
        self.async_scheduling = self.runner.device.type == "cuda" if async_scheduling is None else async_scheduling
        if ranks is not None:
            self.async_scheduling = False  # the ranks step together, one step at a time
            # before multiprocessing's own exit hook, which would wait on workers that wait on us
            atexit.register(self.shutdown)
        self._in_flight: tuple[LaunchedStep, AdvancedStep] | None = None
        # pipeline stages: that many steps in flight at once, over disjoint requests
        self.pipeline_depth = 1 if ranks is None else config.parallel.pipeline_depth or ranks.parallel.mapping.pp_size
        self._pipeline: deque[AdvancedStep] = deque()
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        self.num_steps = 0
        self._start_deadlines: dict[str, float] = {}  # request id -> monotonic time it must have started by
        self.info = self._model_info(num_blocks, tokenizer_path)
        logger.info("KV cache: %d blocks of %d tokens (max %d tokens); max_model_len %d",
                    num_blocks, config.cache.block_size, num_blocks * config.cache.block_size, self.max_model_len)

    @property
    def requests(self) -> dict[str, Sequence]:
        """Unfinished requests by id (the scheduler's; read-only for callers)."""
        return self.scheduler.requests

    @classmethod
    def from_config(cls, config: EngineConfig, progress=print) -> "EngineCore":
        """Resolve the model (pulling the default one if needed) and load it; the tokenizer stays with
        the client, which finds it at `info.tokenizer_path`."""
        from llmserve.checkpoint.pull import resolve_model
        from llmserve.models.loader import load_model

        path = resolve_model(config.model, progress=progress)
        if config.parallel.world_size > 1:
            from llmserve.worker.parallel_runner import start_ranks

            ranks = start_ranks(str(path), config, progress)
            core = cls(ranks.model, ranks.model_config, config, tokenizer_path=str(path), ranks=ranks)
        else:
            torch.manual_seed(config.seed)
            model_config, model = load_model(path, config.device.device, config.device.dtype,
                                             config.device.quantization)
            core = cls(model, model_config, config, tokenizer_path=str(path))
        if config.device.device.startswith("cuda") if config.warmup is None else config.warmup:
            from llmserve.engine.warmup import warm_up

            progress(f"warming up (Triton kernels compile now, not in the first requests): "
                     f"{warm_up(core):.1f} s")
        return core

    def shutdown(self) -> None:
        """Stop the worker ranks of a parallel engine (nothing to do for one rank); idempotent."""
        ranks, self.ranks = self.ranks, None
        if ranks is not None:
            try:
                self.runner.stop_workers()
            except RuntimeError:  # a rank is gone already: the others end with their connections
                logger.debug("stopping the worker ranks", exc_info=True)
            finally:
                ranks.stop()

    def _model_info(self, num_blocks: int, tokenizer_path: str | None) -> ModelInfo:
        device, cache = self.config.device, self.config.cache
        return ModelInfo(
            vocab_size=self.model_config.vocab_size, max_model_len=self.max_model_len,
            eos_token_ids=list(self.model_config.eos_token_id), device=device.device, dtype=device.dtype,
            quantization=device.quantization or self.model_config.quant_algo,
            kv_cache_dtype=str(kv_cache_dtype(cache, device)).replace("torch.", ""),
            num_kv_blocks=num_blocks, block_size=cache.block_size,
            max_num_seqs=self.config.scheduler.max_num_seqs, tokenizer_path=tokenizer_path)

    # ---- requests -------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError when the request can never run (see `check_request`)."""
        check_request(self.info, prompt_token_ids, params)

    def add_request(self, request: EngineCoreRequest) -> None:
        prompt = request.prompt_token_ids
        self.check_request(prompt, request.params)
        room = self.max_model_len - len(prompt)
        seq = Sequence(request.request_id, list(prompt), request.params,
                       max_output_tokens=min(request.params.max_tokens or room, room))
        if request.params.structured_outputs is not None:
            self.grammars.add(request.request_id, request.params.structured_outputs)
        self.scheduler.add(seq)
        self.num_prompt_tokens_total += len(prompt)
        if request.queue_timeout is not None:
            self._start_deadlines[request.request_id] = time.monotonic() + request.queue_timeout

    def abort_requests(self, request_ids: list[str]) -> None:
        """End these requests now and free their blocks; unknown or ended ids are ignored."""
        for request_id in request_ids:
            self.scheduler.abort(request_id)
            self.grammars.remove(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None or bool(self._pipeline)

    def stats(self) -> SchedulerStats:
        kv = self.kv
        return SchedulerStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=kv.num_blocks, kv_blocks_used=kv.num_used_blocks, kv_blocks_cached=kv.num_cached_blocks,
            prefix_cache_queries=kv.prefix_queries, prefix_cache_hits=kv.prefix_hits,
            num_prompt_tokens_total=self.num_prompt_tokens_total,
            num_generation_tokens_total=self.num_generation_tokens_total,
            num_preemptions_total=self.scheduler.num_preemptions, num_steps=self.num_steps)

    # ---- the step -----------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        """Run one scheduling step; the new tokens of every request that progressed.

        With async scheduling the tokens are those of the previous step: this step is queued
        on the device first, so the host's work overlaps the device's.
        """
        self.num_steps += 1
        expired = self._expire_unstarted()
        if self.pipeline_depth > 1:
            outputs = self._step_pipelined()
        elif self.async_scheduling:
            outputs = self._step_overlapped()
        else:
            out = self.scheduler.schedule()
            masks = self.grammars.bitmask_async(list(out.sampling_request_ids)) if self.grammars else None
            # an empty step only drops finished requests' state; the masks are computed during the forward pass
            result = self.runner.execute(out, masks.result if masks is not None else None)
            outputs = self._outputs(self.scheduler.update(out, result), result)
        return EngineCoreOutputs(expired + outputs, self.stats(), time.time())

    def _expire_unstarted(self) -> list[EngineCoreOutput]:
        """End the requests past their queue timeout that were never scheduled (they hold no KV blocks)."""
        if not self._start_deadlines:
            return []
        now, expired = time.monotonic(), []
        for request_id, deadline in list(self._start_deadlines.items()):
            seq = self.requests.get(request_id)
            never_started = seq is not None and _never_scheduled(seq)
            if not never_started or deadline <= now:
                del self._start_deadlines[request_id]
            if never_started and deadline <= now:
                self.scheduler.abort(request_id)
                self.grammars.remove(request_id)
                expired.append(EngineCoreOutput(request_id, [], finish_reason="queue_timeout"))
        return expired

    def _step_overlapped(self) -> list[EngineCoreOutput]:
        if self._in_flight is not None and self._needs_output_ids():
            return self._finish_in_flight()  # penalties read the previous ids: no overlap
        out = self.scheduler.schedule()
        if out.is_empty:
            self.runner.execute(out)  # nothing runs; the runner drops finished requests' state
            return self._finish_in_flight()
        previous = self._in_flight[0] if self._in_flight is not None else None
        constrained = self.grammars.constrained(out.sampling_request_ids) if self.grammars else []
        if constrained:
            # the masks need the previous step's tokens: a helper thread waits for them, advances the
            # matchers and computes the masks, while this one queues the forward pass and turns the
            # previous step into outputs; sampling waits for the masks
            in_flight, self._in_flight = self._in_flight, None
            accepted, masks = self.grammars.bitmask_after(lambda: self._wait_and_accept(in_flight), constrained)
            forward = self.runner.launch_forward(out, previous)
            advanced = self.scheduler.advance(out)
            outputs = []
            if in_flight is not None:
                result, grammar_ended = accepted.result()
                self.runner.collect(in_flight[0], result)
                outputs = self._resolve(in_flight[1], result, grammar_ended)
            launched = self.runner.launch_sampling(forward, masks.result())
        else:
            launched = self.runner.launch(out, previous)
            advanced = self.scheduler.advance(out)
            outputs = self._finish_in_flight()  # waits for the previous step while this one runs
        self._in_flight = (launched, advanced)
        return outputs

    def _step_pipelined(self) -> list[EngineCoreOutput]:
        """Launch a micro-batch of the requests with no token in flight (an even share of them), then, once
        every stage has one, collect the oldest."""
        scheduler = self.scheduler
        share = max(1, -(-(len(scheduler.running) + len(scheduler.waiting)) // self.pipeline_depth))
        out = scheduler.schedule(max_seqs=share, skip_pending=True)
        if not out.is_empty:  # its requests have no token in flight: their matchers are up to date
            masks = self.grammars.bitmask(list(out.sampling_request_ids)) if self.grammars else None
            self.runner.launch_step(out, masks)
            self._pipeline.append(scheduler.advance(out))
        elif out.finished_request_ids or out.preempted_request_ids:
            self.runner.launch_step(out)  # nothing runs; the ranks drop those requests' state
        if not self._pipeline or (len(self._pipeline) < self.pipeline_depth and not out.is_empty):
            return []
        advanced = self._pipeline.popleft()
        result = self.runner.collect_step()
        return self._outputs(scheduler.resolve(advanced, result), result)

    def _finish_in_flight(self) -> list[EngineCoreOutput]:
        if self._in_flight is None:
            return []
        (launched, advanced), self._in_flight = self._in_flight, None
        return self._resolve(advanced, self.runner.collect(launched))

    def _wait_and_accept(self, in_flight: tuple[LaunchedStep, AdvancedStep] | None
                         ) -> tuple[ModelRunnerOutput | None, set[str]]:
        """On the grammar helper thread: the in-flight step's samples, fed to the matchers (no request or
        runner state is touched)."""
        if in_flight is None:
            return None, set()
        result = self.runner.wait_samples(in_flight[0])
        return result, self._accept_grammar_tokens(result)

    def _resolve(self, advanced: AdvancedStep, result: ModelRunnerOutput,
                 grammar_ended: set[str] | None = None) -> list[EngineCoreOutput]:
        return self._outputs(self.scheduler.resolve(advanced, result), result, grammar_ended)

    def _needs_output_ids(self) -> bool:
        return any(seq.params.uses_output_ids for seq in self.scheduler.running)

    def _outputs(self, updated: list[tuple[Sequence, int]], result: ModelRunnerOutput,
                 grammar_ended: set[str] | None = None) -> list[EngineCoreOutput]:
        """One output per request that took a token (from `Scheduler.resolve`), in the runner's batch order.
        `grammar_ended`: `_accept_grammar_tokens(result)` when the caller ran it already."""
        self._gather_prompt_logprobs(result, {seq.request_id: seq for seq, _ in updated})
        self.num_generation_tokens_total += len(updated)
        if self.grammars:
            if grammar_ended is None:
                grammar_ended = self._accept_grammar_tokens(result)
            self._end_grammars(updated, grammar_ended)
        return [self._output(seq, result, row) for seq, row in updated]

    def _accept_grammar_tokens(self, result: ModelRunnerOutput) -> set[str]:
        """Feed each constrained request of the step its new token; those whose grammar is now complete
        (only EOS could follow) or broken. Only requests still running hold a matcher."""
        if not self.grammars:
            return set()
        return set(self.grammars.accept(list(zip(result.request_ids, result.sampled_token_ids))))

    def _end_grammars(self, updated: list[tuple[Sequence, int]], grammar_ended: set[str]) -> None:
        """A request whose grammar ended finishes here with "stop"; a finished one drops its matcher."""
        for seq, _ in updated:
            if seq.request_id not in self.grammars:
                continue
            if seq.request_id in grammar_ended and not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.STOP)
            if seq.is_finished:
                self.grammars.remove(seq.request_id)

    def _gather_prompt_logprobs(self, result: ModelRunnerOutput, updated: dict[str, Sequence]) -> None:
        """Keep each request's scored prompt tokens on its sequence, in order; a preempted request that
        recomputes its prompt scores it again, and what was kept already is not added twice. `updated`:
        the step's requests that took a token (one that finished has left `requests` already)."""
        for scored in result.prompt_logprobs:
            seq = updated.get(scored.request_id) or self.requests.get(scored.request_id)
            if seq is None or seq.prompt_logprobs is False:
                continue
            kept = seq.prompt_logprobs = seq.prompt_logprobs or []
            if scored.first_position == len(kept) + 1:
                kept.extend(scored.entries)

    def _output(self, seq: Sequence, result: ModelRunnerOutput, row: int) -> EngineCoreOutput:
        token_id = result.sampled_token_ids[row]
        finish_reason = stop_reason = None
        if seq.is_finished:
            finish_reason = seq.finish_reason.value
            ended_by_token = token_id in seq.params.stop_token_ids or token_id in self.scheduler.eos_token_ids
            if seq.finish_reason is FinishReason.STOP and ended_by_token:  # not a completed grammar
                stop_reason = token_id
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = [result.logprobs[row]]
        prompt_logprobs = None
        if seq.params.prompt_logprobs is not None and seq.prompt_logprobs is not False:
            prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs or [], False  # sent with the first token
        return EngineCoreOutput(seq.request_id, [token_id], logprobs, finish_reason, stop_reason,
                                seq.num_cached_tokens, prompt_logprobs)


def _never_scheduled(seq: Sequence) -> bool:
    return seq.status is SequenceStatus.WAITING and seq.num_computed_tokens == 0 and seq.num_preemptions == 0
