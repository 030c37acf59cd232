"""Scheduler over a real KV pool with no model: exact batches, preemption, properties."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from llmserve.config import SchedulerConfig
from llmserve.core.kv_cache import KVCacheManager
from llmserve.core.scheduler import Scheduler
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


def run_step(scheduler: Scheduler, token: int = 7):
    """One step with a fake model that samples `token` for every sampling sequence."""
    out = scheduler.schedule()
    num_sampled = sum(out.samples(i) for i in range(len(out.seqs)))
    finished = scheduler.update(out, [token] * num_sampled)
    return out, finished


def test_new_request_joins_running_batch_next_step():
    sched = make_scheduler()
    sched.add(make_seq("a", 5))
    out, _ = run_step(sched)
    assert [s.request_id for s in out.seqs] == ["a"] and out.num_scheduled_tokens == [5]
    sched.add(make_seq("b", 3))
    out, _ = run_step(sched)
    assert [s.request_id for s in out.seqs] == ["a", "b"]
    assert out.num_scheduled_tokens == [1, 3]  # a decodes while b prefills


def test_chunked_prefill_respects_token_budget():
    sched = make_scheduler(max_num_batched_tokens=4)
    seq = make_seq("a", 10)
    sched.add(seq)
    chunks = []
    while not seq.output_token_ids:
        out, _ = run_step(sched)
        chunks.append(out.num_scheduled_tokens[0])
    assert chunks == [4, 4, 2]
    assert seq.num_computed_tokens == 10 and seq.output_token_ids == [7]


def test_max_num_seqs_limits_admission():
    sched = make_scheduler(max_num_seqs=2)
    for name in "abc":
        sched.add(make_seq(name, 2))
    out, _ = run_step(sched)
    assert [s.request_id for s in out.seqs] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_decode_oom_preempts_newest():
    sched = make_scheduler(num_blocks=4, block_size=4)
    a, b = make_seq("a", 7, max_tokens=8), make_seq("b", 7, max_tokens=8)
    sched.add(a)
    sched.add(b)
    run_step(sched)  # both prefill: 2 blocks each, pool full; both sample token 8 of 8 slots
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    out, _ = run_step(sched)  # a and b decode position 7: still in their second block
    assert out.num_scheduled_tokens == [1, 1]
    out, _ = run_step(sched)  # a needs a third block: b (newest) is preempted
    assert [s.request_id for s in out.preempted] == ["b"]
    assert [s.request_id for s in out.seqs] == ["a"]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert list(sched.waiting) == [b] and b.output_token_ids == [7, 7]
    assert a.block_table == [0, 1, 2]


def test_preempted_sequence_resumes_with_its_outputs():
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
    # its first block survived in the prefix cache (a took b's tail block), so 9 - 4 run
    assert out.seqs == [b] and out.num_scheduled_tokens == [5]
    assert b.output_token_ids == [7, 7, 7]


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
    sched.add(make_seq("a", 10, max_tokens=1))
    run_step(sched)
    again = make_seq("b", 10, max_tokens=1)
    sched.add(again)
    out, _ = run_step(sched)
    assert out.num_scheduled_tokens == [2]  # 8 of 10 tokens from the cache
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
