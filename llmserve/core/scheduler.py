"""In-flight batching scheduler: which sequences run this step and with how many tokens.

One rule (as vLLM v1): every sequence's `num_computed_tokens` chases its `num_tokens`
under a per-step token budget, so chunked prefill and decode are the same path. When
the KV pool runs dry, the newest running sequence is preempted (its blocks freed, to be
recomputed) and requeued at the front. Plain Python: no torch.

A step's results arrive in two parts, so the next step can be scheduled while the device
still works (async scheduling): `advance()` counts the tokens as computed and gives each
sampling sequence a placeholder output, `resolve()` fills in the sampled ids and stops
sequences. `update()` does both at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llmserve.config import SchedulerConfig
from llmserve.core.kv_cache import KVCacheManager
from llmserve.core.sequence import PLACEHOLDER, FinishReason, Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerOutput:
    """The step contract: sequences to run, tokens for each, and what was preempted."""

    seqs: list[Sequence] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # whether each sequence reaches its last token this step (so a token is sampled);
    # fixed at schedule time because update() moves the counts it is derived from
    sampling: list[bool] = field(default_factory=list)

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_scheduled_tokens.append(num_tokens)
        self.sampling.append(seq.num_computed_tokens + num_tokens == seq.num_tokens)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def samples(self, index: int) -> bool:
        return self.sampling[index]


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

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        # Phase 1: running sequences, oldest first; preempt the newest when blocks run out.
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            if len(seq.output_token_ids) >= seq.max_output_tokens:
                index += 1  # its last token is still on the device; it ends when resolved
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate_slots(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.add(seq, num_new)
                budget -= num_new
                index += 1

        # Phase 2: admit waiting sequences, unless memory was short this step.
        while self.waiting and budget > 0 and not out.preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting[0]
            computed = self.kv.get_computed_blocks(seq)
            num_cached = len(computed) * self.kv.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(seq, num_new, computed):
                break
            self.waiting.popleft()
            seq.num_computed_tokens = num_cached
            seq.num_cached_tokens = max(seq.num_cached_tokens, min(num_cached, seq.num_prompt_tokens))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.add(seq, num_new)
            budget -= num_new
        return out

    def update(self, out: SchedulerOutput, sampled_token_ids: list[int]) -> list[Sequence]:
        """Apply one step's results at once; returns the sequences that finished.

        `sampled_token_ids` holds one id per sequence for which `out.samples(i)` is true,
        in schedule order.
        """
        return self.resolve(out, self.advance(out), sampled_token_ids)

    def advance(self, out: SchedulerOutput) -> list[tuple[Sequence, int]]:
        """Count the step's tokens as computed and append a placeholder output to each
        sampling sequence; returns (sequence, output index) of each, in schedule order."""
        pending = []
        for i, seq in enumerate(out.seqs):
            seq.num_computed_tokens += out.num_scheduled_tokens[i]
            if out.samples(i):
                pending.append((seq, len(seq.output_token_ids)))
                seq.output_token_ids.append(PLACEHOLDER)
        return pending

    def resolve(self, out: SchedulerOutput, pending: list[tuple[Sequence, int]],
                sampled_token_ids: list[int]) -> list[Sequence]:
        """Put the sampled ids in place of `advance`'s placeholders, register newly full
        blocks, and finish sequences that stop. Sequences that ended meanwhile are skipped."""
        live = [(seq, index, token_id) for (seq, index), token_id in zip(pending, sampled_token_ids, strict=True)
                if not seq.is_finished]
        for seq, index, token_id in live:
            seq.output_token_ids[index] = token_id
        for seq in out.seqs:  # before any finish frees them, so finished prefixes stay reusable
            if seq.status is SequenceStatus.RUNNING:
                self.kv.cache_full_blocks(seq)
        finished = []
        for seq, index, token_id in live:
            reason = self._stop_reason(seq, token_id, num_output=index + 1)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

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

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.requests.get(request_id)
        if seq is not None:
            self.finish(seq, FinishReason.ABORT)
        return seq

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
