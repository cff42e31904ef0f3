"""The prefix cache: content-addressed full blocks and an LRU evictor (vLLM's automatic
prefix caching, the follow-up to paper section 4.4's shared prefix).

Example tests name one behaviour each. The state machine uses hashes with only three
values and two-token blocks over a three-token vocabulary, so hash collisions, equal
tokens after different parents, and block ids reused after eviction are all common.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minipaged.core.block_allocator import BlockAllocator, NoFreeBlocksError
from minipaged.core.prefix_cache import PrefixCache, hash_block
from tests.strategies import (
    MEMORY_CORE_STEPS,
    STATE_MACHINE_EXAMPLES,
    constant_hash,
    tiny_token_ids,
)


def cache_of(*blocks_and_tokens, hash_fn=hash_block):
    """A cache holding one chain: block b_i holds tokens t_i after b_{i-1}."""
    cache, parent_hash, parent = PrefixCache(hash_fn), None, None
    for block, tokens in blocks_and_tokens:
        parent_hash = hash_fn(parent_hash, tokens)
        assert cache.insert(parent_hash, block, tokens, parent) == block
        parent = block
    return cache


def test_hash_block_chains_the_parent_hash():
    assert hash_block(None, [1, 2]) == hash_block(None, (1, 2))
    assert hash_block(None, [1, 2]) != hash_block(hash_block(None, [0, 0]), [1, 2])


def test_lookup_finds_an_inserted_block_by_hash_tokens_and_parent():
    cache = cache_of((5, [1, 2]), (3, [3, 4]))
    assert cache.lookup(hash_block(None, [1, 2]), [1, 2]) == 5
    assert cache.lookup(hash_block(hash_block(None, [1, 2]), [3, 4]), [3, 4], parent=5) == 3
    assert cache.lookup(hash_block(None, [9, 9]), [9, 9]) is None


def test_a_colliding_hash_never_returns_a_block_whose_tokens_differ():
    cache = PrefixCache(constant_hash)
    assert cache.insert(0, block=1, token_ids=[1, 2]) == 1
    assert cache.lookup(0, [1, 3]) is None
    assert cache.insert(0, block=2, token_ids=[1, 3]) == 2   # same hash, both kept
    assert (cache.lookup(0, [1, 2]), cache.lookup(0, [1, 3])) == (1, 2)


def test_equal_tokens_after_a_different_parent_are_not_a_hit():
    # K/V depend on the whole past: [5, 5] after [1, 2] is not [5, 5] after [3, 4]
    cache = cache_of((0, [1, 2]), (1, [5, 5]), hash_fn=constant_hash)
    assert cache.insert(0, block=2, token_ids=[3, 4]) == 2
    assert cache.lookup(0, [5, 5], parent=2) is None
    assert cache.lookup(0, [5, 5], parent=0) == 1


def test_insert_returns_the_cached_twin_instead_of_a_second_copy():
    cache = cache_of((0, [1, 2]))
    assert cache.insert(hash_block(None, [1, 2]), 7, [1, 2]) == 0
    assert 7 not in cache and cache.num_cached == 1


def test_insert_after_an_uncached_parent_is_refused():
    cache = PrefixCache()
    assert cache.insert(hash_block(123, [1, 2]), 4, [1, 2], parent=3) is None
    assert 4 not in cache


def test_lru_eviction_order():
    cache = cache_of((0, [0, 0]))
    for block, tokens in ((1, [1, 1]), (2, [2, 2])):
        cache.insert(hash_block(None, tokens), block, tokens)
    for block in (2, 0, 1):
        cache.make_evictable(block)
    assert cache.evictable_blocks() == [2, 0, 1]
    assert [cache.evict() for _ in range(3)] == [2, 0, 1]
    assert cache.num_cached == 0


def test_a_revived_block_is_not_evicted():
    cache = cache_of((0, [0, 0]))
    cache.insert(hash_block(None, [1, 1]), 1, [1, 1])
    cache.make_evictable(0)
    cache.make_evictable(1)
    cache.revive(0)   # a hit: a sequence uses block 0 again
    assert cache.evict() == 1
    with pytest.raises(NoFreeBlocksError):
        cache.evict()
    assert 0 in cache and not cache.is_evictable(0)


def test_evicting_a_block_drops_its_descendants_so_a_reused_id_cannot_reach_them():
    cache = cache_of((0, [1, 2]), (1, [5, 5]), hash_fn=constant_hash)
    cache.make_evictable(0)   # the parent first, so that it is evicted first
    cache.make_evictable(1)
    assert cache.evict() == 0 and 1 not in cache
    assert cache.insert(0, block=0, token_ids=[3, 4]) == 0   # block 0 reused: new content
    assert cache.lookup(0, [5, 5], parent=0) is None          # [5, 5] followed [1, 2]
    assert cache.evict() == 1   # the dropped child is still memory to reuse
    assert cache.num_evictable == 0


def test_evict_with_nothing_evictable_raises():
    with pytest.raises(NoFreeBlocksError):
        PrefixCache().evict()


def test_only_cached_blocks_in_use_can_become_evictable_and_only_evictable_ones_revive():
    cache = cache_of((0, [1, 2]))
    with pytest.raises(ValueError, match="not in the prefix cache"):
        cache.make_evictable(5)
    with pytest.raises(ValueError, match="not an evictable"):
        cache.revive(0)
    cache.make_evictable(0)
    with pytest.raises(ValueError, match="already evictable"):
        cache.make_evictable(0)
    with pytest.raises(ValueError, match="evictable"):
        cache.insert(hash_block(None, [1, 2]), 0, [1, 2])


def test_lookups_count_queries_and_hits_and_peek_counts_nothing():
    cache = cache_of((0, [1, 2]))
    cache.lookup(hash_block(None, [1, 2]), [1, 2])
    cache.lookup(hash_block(None, [2, 2]), [2, 2])
    cache.peek(hash_block(None, [1, 2]), [1, 2])
    assert (cache.num_queries, cache.num_hits) == (2, 1)


def test_match_walks_the_chain_and_stops_at_the_first_miss():
    cache = cache_of((4, [1, 2]), (6, [3, 4]), (8, [5, 6]))
    blocks, hashes = cache.match([1, 2, 3, 4, 5, 6, 7], block_size=2)
    assert blocks == [4, 6, 8] and hashes[-1] == cache._entries[8].block_hash
    assert cache.match([1, 2, 0, 0, 5, 6, 7], block_size=2)[0] == [4]


def test_match_never_hits_the_block_of_the_last_token():
    cache = cache_of((4, [1, 2]), (6, [3, 4]))
    assert cache.match([1, 2, 3, 4], block_size=2)[0] == [4]   # token 4 is recomputed
    assert cache.match([1, 2, 3, 4, 9], block_size=2)[0] == [4, 6]


def test_release_parks_a_cached_block_and_frees_any_other():
    pool, cache = BlockAllocator(3), PrefixCache()
    cached, plain = pool.allocate(), pool.allocate()
    cache.insert(hash_block(None, [1]), cached, [1])
    cache.release_block(pool, cached)
    cache.release_block(pool, plain)
    assert cache.is_evictable(cached) and not pool.is_free(cached)
    assert pool.is_free(plain) and pool.num_free == 2


def test_take_block_prefers_a_free_block_to_evicting_a_cached_one():
    pool, cache = BlockAllocator(2), PrefixCache()
    cached = pool.allocate()
    cache.insert(hash_block(None, [1]), cached, [1])
    cache.release_block(pool, cached)
    other = cache.take_block(pool)
    assert other != cached and cache.is_evictable(cached)
    assert cache.take_block(pool) == cached   # nothing free left: evict it
    assert pool.refcount(cached) == 1 and cached not in cache
    with pytest.raises(NoFreeBlocksError):
        cache.take_block(pool)


def test_acquiring_a_hit_revives_an_evictable_block():
    pool, cache = BlockAllocator(1), PrefixCache()
    block = pool.allocate()
    cache.insert(hash_block(None, [1]), block, [1])
    cache.release_block(pool, block)
    cache.acquire_block(pool, block)
    assert pool.refcount(block) == 1 and not cache.is_evictable(block)


NUM_BLOCKS = 10
block_tokens = st.lists(tiny_token_ids, min_size=2, max_size=2).map(tuple)
small_hashes = st.integers(0, 2)


class PrefixCacheMachine(RuleBasedStateMachine):
    """Model: the live entries (hash, tokens, parent), the blocks in use, and the evictor
    as a plain list. Blocks are used and released in any order, so a parent may be
    evicted while a child is in use: the child must then leave the cache."""

    def __init__(self):
        super().__init__()
        self.cache = PrefixCache()
        self.live: dict[int, tuple] = {}   # block -> (hash, tokens, parent)
        self.in_use: set[int] = set()      # live or dropped with an evicted ancestor
        self.evictor: list[int] = []       # least recently used first; may hold dropped ones
        self.queries = self.hits = 0

    def _unknown(self):
        return [b for b in range(NUM_BLOCKS)
                if b not in self.live and b not in self.evictor and b not in self.in_use]

    def _match(self, block_hash, tokens, parent):
        found = [b for b, entry in self.live.items() if entry == (block_hash, tokens, parent)]
        assert len(found) <= 1   # never two entries for the same content
        return found[0] if found else None

    @precondition(lambda self: self._unknown())
    @rule(data=st.data(), block_hash=small_hashes, tokens=block_tokens)
    def insert(self, data, block_hash, tokens):
        block = data.draw(st.sampled_from(self._unknown()))
        parent = data.draw(st.sampled_from([None, *sorted(self.in_use)]))
        if parent is not None and parent not in self.live:
            expected = None   # its parent was dropped: this block could never be reached
        else:
            expected = self._match(block_hash, tokens, parent)
            expected = block if expected is None else expected
        assert self.cache.insert(block_hash, block, tokens, parent) == expected
        if expected == block:
            self.live[block] = (block_hash, tokens, parent)
            self.in_use.add(block)

    @rule(data=st.data(), block_hash=small_hashes, tokens=block_tokens)
    def lookup(self, data, block_hash, tokens):
        parent = data.draw(st.sampled_from([None, *range(NUM_BLOCKS)]))
        expected = self._match(block_hash, tokens, parent)
        assert self.cache.lookup(block_hash, tokens, parent) == expected
        self.queries += 1
        self.hits += expected is not None

    @precondition(lambda self: self.in_use)
    @rule(data=st.data())
    def release(self, data):
        block = data.draw(st.sampled_from(sorted(self.in_use)))
        self.in_use.discard(block)
        if block in self.live:
            self.cache.make_evictable(block)
            self.evictor.append(block)
        else:   # dropped from the cache: its owner frees it as a plain block
            with pytest.raises(ValueError):
                self.cache.make_evictable(block)

    @precondition(lambda self: any(b in self.live for b in self.evictor))
    @rule(data=st.data())
    def revive(self, data):
        block = data.draw(st.sampled_from([b for b in self.evictor if b in self.live]))
        self.cache.revive(block)
        self.evictor.remove(block)
        self.in_use.add(block)

    @rule()
    def evict(self):
        if not self.evictor:
            with pytest.raises(NoFreeBlocksError):
                self.cache.evict()
            return
        assert self.cache.evict() == self.evictor[0]   # least recently used first
        stack = [self.evictor.pop(0)]
        while stack:   # it and all its descendants leave the cache
            block = stack.pop()
            if block in self.live:
                stack += [b for b, (_, _, parent) in self.live.items() if parent == block]
                del self.live[block]

    @invariant()
    def cache_matches_the_model(self):
        assert self.cache.evictable_blocks() == self.evictor
        assert self.cache.num_evictable == len(self.evictor)
        assert self.cache.num_cached == len(self.live)
        for b in range(NUM_BLOCKS):
            assert (b in self.cache) == (b in self.live)
            assert self.cache.is_evictable(b) == (b in self.evictor)
        assert (self.cache.num_queries, self.cache.num_hits) == (self.queries, self.hits)


TestPrefixCacheStateMachine = PrefixCacheMachine.TestCase
TestPrefixCacheStateMachine.settings = settings(max_examples=STATE_MACHINE_EXAMPLES,
                                                stateful_step_count=MEMORY_CORE_STEPS)
