"""In-flight batching scheduler: which sequences run this step and with how many tokens.

One rule (as vLLM v1): every sequence's `num_computed_tokens` chases its `num_tokens`
under a per-step token budget, so chunked prefill and decode are the same path. When
the KV pool runs dry, the newest running sequence is preempted (its blocks freed, to be
recomputed) and requeued at the front. Plain Python: no torch.

`schedule()` returns a plain-data `SchedulerOutput` keyed by request id (see
scheduler_output.py); the runner answers with a `ModelRunnerOutput`. A step's results
arrive in two parts, so the next step can be scheduled while the device still works (async
scheduling): `advance()` counts the tokens as computed and gives each sampling sequence a
placeholder output, `resolve()` fills in the sampled ids and stops sequences. `update()`
does both at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llmserve.config import SchedulerConfig
from llmserve.core.kv_cache import KVCacheManager
from llmserve.core.scheduler_output import ModelRunnerOutput, NewRequestData, SchedulerOutput
from llmserve.core.sequence import PLACEHOLDER, FinishReason, Sequence, SequenceStatus


@dataclass(slots=True)
class AdvancedStep:
    """A step counted as computed whose samples are not in yet (the scheduler's own bookkeeping)."""

    seqs: list[Sequence]  # every scheduled sequence, in schedule order
    pending: dict[str, tuple[Sequence, int]]  # each sampling sequence and the index of its placeholder output


class Scheduler:
    """Admits, schedules, updates and finishes sequences over a KVCacheManager."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, eos_token_ids: list[int] = ()):
        self.config = config
        self.kv = kv
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self.num_preemptions = 0
        self._finished_ids: list[str] = []  # ended since the last schedule(): the runner drops them

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        assert seq.request_id not in self.requests, f"duplicate request id {seq.request_id}"
        assert seq.max_output_tokens >= 1, "a sequence must be allowed at least one token"
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def schedule(self, max_seqs: int | None = None, skip_pending: bool = False) -> SchedulerOutput:
        """Pick this step's sequences and token counts under the budget; plain data for the runner.

        Pipeline parallelism keeps several steps in flight over disjoint requests: `skip_pending` leaves
        out (and never preempts) the requests whose sampled token is still in flight, and `max_seqs` caps
        this step's share of the running requests, so that the steps in flight split them evenly.
        """
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        cached, num_scheduled, sampling = out.cached_requests, out.num_scheduled_tokens, out.sampling_request_ids
        budget = self.config.max_num_batched_tokens
        room = max_seqs if max_seqs is not None else len(self.running) + len(self.waiting)

        # Phase 1: running sequences, oldest first; preempt the newest when blocks run out.
        # The runner holds them already: it gets only their new block ids.
        index = 0
        while index < len(self.running) and budget > 0 and len(num_scheduled) < room:
            seq = self.running[index]
            if len(seq.output_token_ids) >= seq.max_output_tokens or (skip_pending and _pending(seq)):
                index += 1  # its last token is still on the device; it ends when resolved
                continue
            num_left = seq.num_tokens - seq.num_computed_tokens
            num_new = min(num_left, budget)
            num_blocks = len(seq.block_table)
            while not self.kv.allocate_slots(seq, num_new):
                victim = self._victim(skip_pending)  # at worst `seq` itself
                self.running.remove(victim)
                self._preempt(victim)
                out.preempted_request_ids.append(victim.request_id)
                if victim is seq:
                    break
            else:
                cached.request_ids.append(seq.request_id)
                cached.new_block_ids.append(seq.block_table[num_blocks:])
                cached.num_computed_tokens.append(seq.num_computed_tokens)
                num_scheduled[seq.request_id] = num_new
                if num_new == num_left:
                    sampling.add(seq.request_id)
                budget -= num_new
                index += 1

        # Phase 2: admit waiting sequences, unless memory was short this step. The runner
        # gets them whole (a resumed one with its outputs so far).
        while self.waiting and budget > 0 and not out.preempted_request_ids and len(num_scheduled) < room:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting[0]
            # a request scoring its prompt computes every position: its logits are the point
            computed = [] if seq.params.prompt_logprobs is not None else self.kv.get_computed_blocks(seq)
            num_cached = len(computed) * self.kv.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(seq, num_new, computed):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = num_cached
            seq.num_cached_tokens = max(seq.num_cached_tokens, min(num_cached, seq.num_prompt_tokens))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.new_requests.append(_new_request_data(seq))
            num_scheduled[seq.request_id] = num_new
            if num_cached + num_new == seq.num_tokens:
                sampling.add(seq.request_id)
            budget -= num_new
        return out

    def update(self, out: SchedulerOutput, result: ModelRunnerOutput) -> list[tuple[Sequence, int]]:
        """Apply one step's results at once; see `resolve` for what it returns."""
        return self.resolve(self.advance(out), result)

    def advance(self, out: SchedulerOutput) -> AdvancedStep:
        """Count the step's tokens as computed and append a placeholder output to each sampling sequence."""
        step = AdvancedStep([], {})
        requests, sampling = self.requests, out.sampling_request_ids
        for request_id, num_new in out.num_scheduled_tokens.items():
            seq = requests[request_id]
            seq.num_computed_tokens += num_new
            step.seqs.append(seq)
            if request_id in sampling:
                step.pending[request_id] = (seq, len(seq.output_token_ids))
                seq.output_token_ids.append(PLACEHOLDER)
        return step

    def resolve(self, step: AdvancedStep, result: ModelRunnerOutput) -> list[tuple[Sequence, int]]:
        """Put the sampled ids in place of `advance`'s placeholders, register newly full blocks and
        finish sequences that stop.

        Returns (sequence, row of `result`) for each sequence that took its token, in the result's
        order; those that stopped are finished. Sequences that ended meanwhile are skipped.
        """
        assert len(result.request_ids) == len(step.pending), "the runner must sample exactly the sampling requests"
        live = []
        for row, (request_id, token_id) in enumerate(zip(result.request_ids, result.sampled_token_ids)):
            seq, index = step.pending[request_id]
            if not seq.is_finished:
                seq.output_token_ids[index] = token_id
                live.append((seq, row, index))
        for seq in step.seqs:  # before any finish frees them, so finished prefixes stay reusable
            if seq.status is SequenceStatus.RUNNING:
                self.kv.cache_full_blocks(seq)
        for seq, row, index in live:
            reason = self._stop_reason(seq, result.sampled_token_ids[row], num_output=index + 1)
            if reason is not None:
                self.finish(seq, reason)
        return [(seq, row) for seq, row, _ in live]

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End `seq` (for any reason) and free its blocks; idempotent."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.kv.free(seq)
        while seq.output_token_ids and seq.output_token_ids[-1] == PLACEHOLDER:
            seq.output_token_ids.pop()  # a token still on the device is dropped
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self.requests[seq.request_id]
        self._finished_ids.append(seq.request_id)

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.requests.get(request_id)
        if seq is not None:
            self.finish(seq, FinishReason.ABORT)
        return seq

    def _victim(self, skip_pending: bool) -> Sequence:
        """The newest running request that may be preempted: not one in flight, when skipping those (the
        caller's own request is a candidate, so there always is one)."""
        return next(seq for seq in reversed(self.running) if not (skip_pending and _pending(seq)))

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _stop_reason(self, seq: Sequence, token_id: int, num_output: int) -> FinishReason | None:
        params = seq.params
        if num_output >= params.min_tokens:
            if token_id in params.stop_token_ids:
                return FinishReason.STOP
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return FinishReason.STOP
        if num_output >= seq.max_output_tokens:
            return FinishReason.LENGTH
        return None


def _pending(seq: Sequence) -> bool:
    """Its last sampled token is still in flight (a placeholder until its step is resolved)."""
    return bool(seq.output_token_ids) and seq.output_token_ids[-1] == PLACEHOLDER


def _new_request_data(seq: Sequence) -> NewRequestData:
    # every output of a waiting sequence is on the host: it was resolved before it could be readmitted
    assert PLACEHOLDER not in seq.output_token_ids, f"{seq.request_id} readmitted with a token in flight"
    return NewRequestData(seq.request_id, seq.prompt_token_ids, list(seq.output_token_ids), seq.params,
                          list(seq.block_table), seq.num_computed_tokens)
