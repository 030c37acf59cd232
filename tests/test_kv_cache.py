"""KV block pool: exact block ids, ref counts and free-queue order on tiny pools."""

import pytest

from llmserve.core.kv_cache import KVCacheManager
from llmserve.core.sequence import Sequence
from llmserve.sampling_params import SamplingParams


def make_seq(request_id: str, tokens: list[int]) -> Sequence:
    return Sequence(request_id, tokens, SamplingParams(max_tokens=8), max_output_tokens=8)


def make_pool(num_blocks: int = 8, block_size: int = 4, **kw) -> KVCacheManager:
    return KVCacheManager(num_blocks, block_size, **kw)


def compute(pool: KVCacheManager, seq: Sequence, n: int) -> None:
    """Pretend the model computed `n` more tokens of `seq`."""
    seq.num_computed_tokens += n
    pool.cache_full_blocks(seq)


def test_allocate_takes_blocks_in_order_and_free_returns_them():
    pool = make_pool()
    seq = make_seq("a", list(range(10)))
    assert pool.allocate_slots(seq, 10)
    assert seq.block_table == [0, 1, 2]
    assert pool.num_free_blocks == 5 and pool.num_used_blocks == 3
    pool.free(seq)
    assert seq.block_table == [] and pool.num_free_blocks == 8
    assert all(b.ref_count == 0 for b in pool.blocks)


def test_allocate_fails_without_side_effects_when_pool_is_short():
    pool = make_pool(num_blocks=2)
    seq = make_seq("a", list(range(12)))
    assert not pool.allocate_slots(seq, 12)
    assert seq.block_table == [] and pool.num_free_blocks == 2


def test_prefix_hit_shares_blocks():
    pool = make_pool()
    first = make_seq("a", list(range(10)))
    pool.allocate_slots(first, 10)
    compute(pool, first, 10)  # blocks 0 and 1 are full and hashed
    second = make_seq("b", list(range(10)))
    hit = pool.get_computed_blocks(second)
    assert hit == [0, 1]
    assert pool.allocate_slots(second, 2, hit)
    assert second.block_table == [0, 1, 3]
    assert [pool.blocks[i].ref_count for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert pool.prefix_hits == 8


def test_full_prompt_hit_leaves_last_token_to_compute():
    pool = make_pool()
    first = make_seq("a", list(range(8)))
    pool.allocate_slots(first, 8)
    compute(pool, first, 8)
    again = make_seq("b", list(range(8)))
    assert pool.get_computed_blocks(again) == [0]  # not both: one token must run for logits


def test_freed_prefix_stays_cached_until_evicted_lru():
    pool = make_pool(num_blocks=4)
    seq = make_seq("a", list(range(9)))
    pool.allocate_slots(seq, 9)
    compute(pool, seq, 9)
    pool.free(seq)
    # the partial tail block 2 has no hash: it is handed out first; then block 3, then LRU
    assert list(pool.free_queue) == [2, 3, 1, 0]
    assert pool.num_cached_blocks == 2
    again = make_seq("b", list(range(9)))
    assert pool.get_computed_blocks(again) == [0, 1]
    other = make_seq("c", [99] * 12)
    assert pool.allocate_slots(other, 12)
    assert other.block_table == [2, 3, 1]  # block 1 evicted, block 0 still cached
    assert pool.num_cached_blocks == 1
    assert pool.get_computed_blocks(make_seq("d", list(range(9)))) == [0]


def test_reviving_cached_blocks_counts_against_free_pool():
    pool = make_pool(num_blocks=3)
    seq = make_seq("a", list(range(9)))
    pool.allocate_slots(seq, 9)
    compute(pool, seq, 9)
    pool.free(seq)
    again = make_seq("b", list(range(9)) + [5, 5, 5, 5])
    hit = pool.get_computed_blocks(again)
    assert hit == [0, 1]
    # 13 tokens need 4 blocks: 2 revived + 2 new, but only 1 other block is free
    assert not pool.can_allocate(again, 5, hit)
    assert pool.can_allocate(again, 4, hit)


def test_no_prefix_cache_when_disabled():
    pool = make_pool(enable_prefix_caching=False)
    seq = make_seq("a", list(range(8)))
    pool.allocate_slots(seq, 8)
    compute(pool, seq, 8)
    assert pool.get_computed_blocks(make_seq("b", list(range(8)))) == []
    assert pool.hash_to_block == {}


def test_fp8_kv_cache_is_refused_on_cpu():
    from llmserve.config import CacheConfig, DeviceConfig, EngineConfig

    with pytest.raises(ValueError, match="fp8 needs CUDA"):
        EngineConfig(cache=CacheConfig(kv_cache_dtype="fp8"), device=DeviceConfig("cpu"))
    with pytest.raises(ValueError, match="unknown kv_cache_dtype"):
        CacheConfig(kv_cache_dtype="int4")
