"""KV block pool: ref-counted fixed-size blocks with chained-hash prefix caching.

A block is free (ref 0, no hash), cached (ref 0, hashed, evictable) or in use (ref > 0).
Free and cached blocks sit in one LRU queue; unhashed blocks go to its front so that
cached prefixes are evicted last. Plain Python: no torch.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from llmserve.core.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


def chain_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    """128-bit hash of a full block given its parent's hash (so equal hash = equal prefix)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class KVCacheManager:
    """Hands out KV blocks to sequences; the scheduler's only view of memory."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0, "the pool needs blocks of positive size"
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.seq_block_hashes: dict[str, list[bytes]] = {}
        self.num_cached_blocks = 0  # ref count 0 but hashed: kept as a counter so readers never iterate
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found cached

    # ---- counts ---------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free or evictable cached)."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache lookup ------------------------------------------------------
    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Longest cached prefix of `seq` in full blocks, leaving >= 1 token to compute."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hit: list[int] = []
        parent = None
        tokens = seq.token_ids()
        for i in range(max_blocks):
            parent = chain_hash(parent, self._block_tokens(tokens, i))
            block_id = self.hash_to_block.get(parent)
            if block_id is None:
                break
            hit.append(block_id)
        self.prefix_queries += seq.num_prompt_tokens
        self.prefix_hits += min(len(hit) * self.block_size, seq.num_prompt_tokens)
        return hit

    # ---- allocation -----------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        new_blocks, revived = self._blocks_to_take(seq, num_new_tokens, computed_blocks)
        return new_blocks + revived <= len(self.free_queue)

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        """Grow `seq.block_table` to hold its computed tokens plus `num_new_tokens`.

        `computed_blocks` (from get_computed_blocks, for a sequence with no blocks yet) are
        shared, not copied. Returns False, changing nothing, when the pool is too small.
        Every running sequence comes through here each step, so it stays one short path.
        """
        new_blocks, revived = self._blocks_to_take(seq, num_new_tokens, computed_blocks)
        if new_blocks + revived > len(self.free_queue):
            return False
        for block_id in computed_blocks:
            self._touch(block_id)
            seq.block_table.append(block_id)
        for _ in range(new_blocks):
            seq.block_table.append(self._take_free_block())
        return True

    def _blocks_to_take(self, seq: Sequence, num_new_tokens: int, computed_blocks) -> tuple[int, int]:
        """(fresh blocks the sequence still needs, cached computed_blocks revived from the free queue)."""
        total = seq.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        new_blocks = max(self.blocks_needed(total) - len(seq.block_table) - len(computed_blocks), 0)
        revived = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0) if computed_blocks else 0
        return new_blocks, revived

    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
            self.num_cached_blocks -= block.block_hash is not None
        block.ref_count += 1

    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict the cached prefix it held
            self.num_cached_blocks -= 1
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    # ---- caching and freeing ------------------------------------------------------------
    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of blocks that `seq` has fully computed."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= len(self.seq_block_hashes.get(seq.request_id, ())):
            return  # the usual decode step: no block filled up
        hashes = self.seq_block_hashes.setdefault(seq.request_id, [])
        tokens = seq.token_ids()
        for i in range(len(hashes), num_full):
            parent = hashes[-1] if hashes else None
            block_hash = chain_hash(parent, self._block_tokens(tokens, i))
            hashes.append(block_hash)
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and block_hash not in self.hash_to_block:
                block.block_hash = block_hash
                self.hash_to_block[block_hash] = block.block_id

    def free(self, seq: Sequence) -> None:
        """Release all of `seq`'s blocks, tail first, so its prefix stays cached longest."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.block_hash is None:  # nothing to reuse: hand it out first
                    self.free_queue.move_to_end(block_id, last=False)
                else:
                    self.num_cached_blocks += 1
        seq.block_table.clear()
        self.seq_block_hashes.pop(seq.request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget all cached prefixes (blocks in use keep their data)."""
        for block in self.blocks:
            block.block_hash = None
        self.num_cached_blocks = 0
        self.hash_to_block.clear()
        self.seq_block_hashes.clear()

    def _block_tokens(self, tokens: list[int], index: int) -> list[int]:
        start = index * self.block_size
        return tokens[start:start + self.block_size]
