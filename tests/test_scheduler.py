"""Scheduler over a real KV pool with no model: exact batches, preemption, properties."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from llmserve.config import SchedulerConfig
from llmserve.core.kv_cache import KVCacheManager
from llmserve.core.scheduler import Scheduler
from llmserve.core.scheduler_output import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput
from llmserve.core.sequence import FinishReason, Sequence, SequenceStatus
from llmserve.sampling_params import SamplingParams

EOS = 0


def make_scheduler(num_blocks: int = 16, block_size: int = 4, **overrides) -> Scheduler:
    fields = dict(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256)
    fields.update(overrides)
    return Scheduler(SchedulerConfig(**fields), KVCacheManager(num_blocks, block_size), [EOS])


def make_seq(request_id: str, prompt_len: int, max_tokens: int = 4, first_token: int = 1) -> Sequence:
    prompt = [first_token + i for i in range(prompt_len)]
    return Sequence(request_id, prompt, SamplingParams(max_tokens=max_tokens), max_output_tokens=max_tokens)


def fake_model_output(out: SchedulerOutput, token: int) -> ModelRunnerOutput:
    """What a model sampling `token` for every request that samples would return."""
    request_ids = [r for r in reversed(out.num_scheduled_tokens) if r in out.sampling_request_ids]
    return ModelRunnerOutput(request_ids, [token] * len(request_ids))  # any row order will do


def run_step(scheduler: Scheduler, token: int = 7):
    """One step with a fake model; returns the SchedulerOutput and the sequences that finished."""
    out = scheduler.schedule()
    updated = scheduler.update(out, fake_model_output(out, token))
    return out, [seq for seq, _ in updated if seq.is_finished]


def new_request(seq: Sequence, block_ids: list[int], outputs=(), num_computed: int = 0) -> NewRequestData:
    return NewRequestData(seq.request_id, seq.prompt_token_ids, list(outputs), seq.params, block_ids, num_computed)


def test_first_step_sends_new_requests_whole():
    sched = make_scheduler()
    a = make_seq("a", 5)
    sched.add(a)
    out, _ = run_step(sched)
    assert out == SchedulerOutput(new_requests=[new_request(a, [0, 1])], num_scheduled_tokens={"a": 5},
                                  sampling_request_ids={"a"})


def test_new_request_joins_running_batch_next_step():
    sched = make_scheduler()
    sched.add(make_seq("a", 5))
    run_step(sched)
    b = make_seq("b", 3, first_token=40)
    sched.add(b)
    out, _ = run_step(sched)
    # a decodes position 5, still in its second block: no new block ids; b prefills
    assert out.cached_requests == CachedRequestData(["a"], [[]], [5])
    assert out.new_requests == [new_request(b, [2])]
    assert out.num_scheduled_tokens == {"a": 1, "b": 3} and out.sampling_request_ids == {"a", "b"}


def test_chunked_prefill_respects_token_budget():
    sched = make_scheduler(max_num_batched_tokens=4)
    seq = make_seq("a", 10)
    sched.add(seq)
    outs = [run_step(sched)[0] for _ in range(3)]
    assert [o.num_scheduled_tokens for o in outs] == [{"a": 4}, {"a": 4}, {"a": 2}]
    assert outs[0].new_requests == [new_request(seq, [0])]
    assert [o.cached_requests for o in outs[1:]] == [CachedRequestData(["a"], [[1]], [4]),
                                                     CachedRequestData(["a"], [[2]], [8])]
    assert [o.sampling_request_ids for o in outs] == [set(), set(), {"a"}]  # only the last chunk samples
    assert seq.num_computed_tokens == 10 and seq.output_token_ids == [7]


def test_max_num_seqs_limits_admission():
    sched = make_scheduler(max_num_seqs=2)
    for name in "abc":
        sched.add(make_seq(name, 2))
    out, _ = run_step(sched)
    assert [r.request_id for r in out.new_requests] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_decode_oom_preempts_newest():
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = make_seq("a", 7, max_tokens=8), make_seq("b", 7, max_tokens=8, first_token=50)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefill: 2 blocks each, pool full; both sample token 8 of 8 slots
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    out, _ = run_step(sched)  # a and b decode position 7: still in their second block
    assert out.cached_requests == CachedRequestData(["a", "b"], [[], []], [7, 7])
    out, _ = run_step(sched)  # a needs a third block: b (newest) is preempted
    assert out.preempted_request_ids == ["b"] and out.new_requests == []
    # b's blocks were freed tail first and are hashed (kept as cache): a takes b's tail block, 3
    assert out.cached_requests == CachedRequestData(["a"], [[3]], [8]) and out.num_scheduled_tokens == {"a": 1}
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert list(sched.waiting) == [b] and b.output_token_ids == [7, 7]
    assert a.block_table == [0, 1, 3]


def test_preempted_request_resumes_as_new_with_its_outputs():
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = make_seq("a", 7, max_tokens=3), make_seq("b", 7, max_tokens=8, first_token=50)
    sched.add(a)
    sched.add(b)
    for _ in range(3):
        run_step(sched)
    assert b.status is SequenceStatus.WAITING
    while a.status is not SequenceStatus.FINISHED:
        run_step(sched)
    out, _ = run_step(sched)  # b recomputes prompt + its 2 outputs, then samples its 3rd
    # its first block (2) survived in the prefix cache, so 9 - 4 tokens run; then a's unhashed tail
    # block (3, at the front of the free queue) and the least recently used cached block (1)
    assert out.new_requests == [new_request(b, [2, 3, 1], outputs=[7, 7], num_computed=4)]
    assert out.cached_requests == CachedRequestData() and out.finished_request_ids == ["a"]
    assert out.num_scheduled_tokens == {"b": 5} and out.sampling_request_ids == {"b"}
    assert b.output_token_ids == [7, 7, 7]


def test_finished_ids_reach_the_next_schedule_once():
    sched = make_scheduler(max_num_seqs=1)
    sched.add(make_seq("a", 3, max_tokens=5))
    sched.add(make_seq("b", 3))
    _, finished = run_step(sched, token=EOS)
    assert [s.request_id for s in finished] == ["a"]
    sched.add(make_seq("c", 3))
    sched.abort("c")  # never scheduled: the runner ignores the id
    out, _ = run_step(sched)
    assert out.finished_request_ids == ["a", "c"] and list(out.num_scheduled_tokens) == ["b"]
    out, _ = run_step(sched)
    assert out.finished_request_ids == []


def test_eos_and_max_tokens_finish_and_free():
    sched = make_scheduler()
    a = make_seq("a", 3, max_tokens=5)
    sched.add(a)
    _, finished = run_step(sched, token=EOS)
    assert finished == [a] and a.finish_reason is FinishReason.STOP
    b = make_seq("b", 3, max_tokens=2)
    sched.add(b)
    run_step(sched)
    _, finished = run_step(sched)
    assert finished == [b] and b.finish_reason is FinishReason.LENGTH
    assert sched.kv.num_used_blocks == 0


def test_update_skips_a_request_aborted_while_its_step_ran():
    sched = make_scheduler()
    a, b = make_seq("a", 3), make_seq("b", 3, first_token=20)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    advanced = sched.advance(out)
    sched.abort("a")
    updated = sched.resolve(advanced, ModelRunnerOutput(["b", "a"], [9, 8]))
    assert updated == [(b, 0)] and b.output_token_ids == [9] and a.output_token_ids == []


def test_abort_waiting_and_running_frees_blocks():
    sched = make_scheduler(max_num_seqs=1)
    sched.add(make_seq("a", 5))
    sched.add(make_seq("b", 5))
    run_step(sched)
    assert sched.abort("a").finish_reason is FinishReason.ABORT
    assert sched.abort("b").finish_reason is FinishReason.ABORT
    assert sched.abort("zzz") is None
    assert not sched.has_unfinished() and sched.kv.num_used_blocks == 0


def test_repeated_prompt_reuses_cached_prefix():
    sched = make_scheduler(block_size=4)
    a = make_seq("a", 10, max_tokens=1)
    sched.add(a)
    run_step(sched)
    again = make_seq("b", 10, max_tokens=1)
    sched.add(again)
    out, _ = run_step(sched)
    # 8 of 10 tokens from the cache: a's first two blocks, shared; then a's unhashed tail block,
    # which went to the front of the free queue
    assert out.new_requests == [new_request(again, [0, 1, 2], num_computed=8)]
    assert out.num_scheduled_tokens == {"b": 2}
    assert again.num_cached_tokens == 8 and sched.kv.prefix_hits == 8


# ---- properties: random arrivals, aborts and finishes --------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 20), st.integers(1, 6), st.integers(0, 3)),
        st.tuples(st.just("step"), st.integers(0, 9)),
        st.tuples(st.just("abort"), st.integers(0, 30)),
    ),
    max_size=60,
)


def check_pool_invariants(sched: Scheduler) -> None:
    kv = sched.kv
    owners: dict[int, int] = {}
    for seq in sched.running:
        for block_id in seq.block_table:
            owners[block_id] = owners.get(block_id, 0) + 1
        assert len(seq.block_table) * kv.block_size >= seq.num_computed_tokens
    for seq in sched.waiting:
        assert seq.block_table == [], "a waiting sequence holds no blocks"
    for block in kv.blocks:
        assert block.ref_count == owners.get(block.block_id, 0), f"block {block.block_id} ref count"
        assert (block.ref_count == 0) == (block.block_id in kv.free_queue)
        if block.ref_count > 1:
            assert block.block_hash is not None, "only cached prefix blocks are shared"
    assert kv.num_free_blocks + len(owners) == kv.num_blocks
    assert kv.num_cached_blocks == sum(1 for b in kv.free_queue if kv.blocks[b].block_hash is not None)
    for block_hash, block_id in kv.hash_to_block.items():
        assert kv.blocks[block_id].block_hash == block_hash


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(6, 24), budget=st.sampled_from([3, 8, 64]))
def test_random_traffic_never_leaks_or_overcommits(ops, num_blocks, budget):
    sched = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=budget, max_num_seqs=4)
    added = []
    for op in ops:
        if op[0] == "add":
            _, prompt_len, max_tokens, family = op
            prompt_len = min(prompt_len, num_blocks * 4 - max_tokens)  # must fit the pool alone
            seq = make_seq(f"r{len(added)}", prompt_len, max_tokens, first_token=1 + family * 100)
            sched.add(seq)
            added.append(seq)
        elif op[0] == "step":
            run_step(sched, token=op[1])
        elif added:
            sched.abort(added[op[1] % len(added)].request_id)
        check_pool_invariants(sched)
    for _ in range(500):  # everything left finishes: no livelock
        if not sched.has_unfinished():
            break
        run_step(sched, token=5)
        check_pool_invariants(sched)
    assert not sched.has_unfinished()
    assert sched.kv.num_used_blocks == 0
    assert all(s.is_finished for s in added)
    for seq in added:
        if seq.finish_reason is FinishReason.LENGTH:
            assert len(seq.output_token_ids) == seq.max_output_tokens


def test_pipeline_micro_batches_are_disjoint_and_share_the_requests():
    """Two steps in flight (pp=2): the second takes only requests with no token in flight, each an even share."""
    sched = make_scheduler(num_blocks=32)
    for i in range(4):
        sched.add(make_seq(f"r{i}", 3, max_tokens=6, first_token=10 * i + 1))
    first = sched.schedule(max_seqs=2, skip_pending=True)
    in_flight = sched.advance(first)
    second = sched.schedule(max_seqs=2, skip_pending=True)
    assert set(first.num_scheduled_tokens) == {"r0", "r1"} and set(second.num_scheduled_tokens) == {"r2", "r3"}
    sched.advance(second)
    assert sched.schedule(max_seqs=2, skip_pending=True).is_empty  # everyone has a token in flight
    sched.resolve(in_flight, fake_model_output(first, 7))
    third = sched.schedule(max_seqs=2, skip_pending=True)
    assert set(third.num_scheduled_tokens) == {"r0", "r1"}  # back as soon as their tokens are known


def test_pipeline_preemption_never_takes_a_request_in_flight():
    sched = make_scheduler(num_blocks=3, block_size=4)
    a, b = make_seq("a", 7, max_tokens=8), make_seq("b", 2, max_tokens=8, first_token=50)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a prefills into 2 blocks, b into 1: the pool is full
    step_a = sched.schedule(max_seqs=1, skip_pending=True)  # a decodes position 7, still in its second block
    in_flight_a = sched.advance(step_a)
    step_b = sched.schedule(max_seqs=1, skip_pending=True)  # a is in flight: b's turn
    assert set(step_b.num_scheduled_tokens) == {"b"}
    sched.advance(step_b)
    sched.resolve(in_flight_a, fake_model_output(step_a, 7))
    out = sched.schedule(max_seqs=1, skip_pending=True)
    # a needs a third block; b, the newest, is in flight and never the victim: a gives way itself
    assert out.preempted_request_ids == ["a"] and out.is_empty
    assert b.status is SequenceStatus.RUNNING and b.block_table and a.status is SequenceStatus.WAITING
