"""The block manager, one behaviour per test (paper sections 4.2-4.5 and prefix caching).

The random sequences of operations are in test_block_manager_state_machine.py.
"""

from __future__ import annotations

import pytest

from minipaged.core.block_allocator import NoFreeBlocksError
from minipaged.core.block_manager import AllocStatus, BlockManager
from tests.strategies import constant_hash


def manager(num_blocks=8, block_size=4, **kwargs) -> BlockManager:
    kwargs.setdefault("watermark", 0.0)
    return BlockManager(num_blocks, block_size, **kwargs)


def computed(bm: BlockManager, seq_id, prompt) -> list[int]:
    """Admit a prompt and run its prefill; returns its block table."""
    bm.allocate([seq_id], prompt)
    bm.mark_computed(seq_id, len(prompt))
    return bm.get_block_table(seq_id)


# ---- allocation (4.2) and decoding (4.3) ---------------------------------------------------
def test_a_prompt_gets_ceil_len_over_block_size_blocks():
    bm = manager()
    bm.allocate([0], range(9))
    assert len(bm.get_block_table(0)) == 3
    assert bm.num_free_blocks == 5 and bm.usage == 3 / 8


def test_a_group_shares_its_prompt_blocks():
    bm = manager()
    bm.allocate([0, 1, 2], range(6))
    table = bm.get_block_table(0)
    assert bm.get_block_table(1) == bm.get_block_table(2) == table
    assert [bm.device.refcount(b) for b in table] == [3, 3]


def test_a_new_block_is_taken_only_when_the_last_one_is_full():
    bm = manager()
    bm.allocate([0], range(3))
    assert bm.append_slots(0, [3]) == [] and len(bm.get_block_table(0)) == 1
    bm.append_slots(0, [4])
    assert len(bm.get_block_table(0)) == 2 and bm.get_token_ids(0) == [0, 1, 2, 3, 4]


def test_exhaust_then_free_returns_every_block():
    bm = manager(num_blocks=4)
    bm.allocate([0], range(8))
    bm.allocate([1], range(8))
    assert bm.can_allocate([1]) is AllocStatus.LATER
    with pytest.raises(NoFreeBlocksError):
        bm.allocate([2], [1])
    assert not bm.has_seq(2)
    bm.free(0)
    bm.free(1)
    assert bm.num_free_blocks == 4 and bm.usage == 0


# ---- sharing and copy-on-write (4.4) -------------------------------------------------------
def test_fork_shares_blocks_until_first_write():
    bm = manager()
    bm.allocate([0], range(6))
    bm.fork(0, 1)
    parent = bm.get_block_table(0)
    assert bm.get_block_table(1) == parent
    assert [bm.device.refcount(b) for b in parent] == [2, 2]
    copies = bm.append_slots(1, [99])
    child = bm.get_block_table(1)
    assert copies == [(parent[1], child[1])] and child[0] == parent[0]
    assert bm.get_block_table(0) == parent and bm.get_token_ids(0) == list(range(6))
    assert bm.num_cow_copies == 1


def test_copy_on_write_copies_only_the_partly_filled_last_block():
    bm = manager()
    bm.allocate([0], range(10))   # blocks: full, full, 2 of 4 slots
    bm.fork(0, 1)
    parent = bm.get_block_table(0)
    copies = bm.append_slots(1, [7])
    assert copies == [(parent[2], bm.get_block_table(1)[2])]
    assert [bm.device.refcount(b) for b in parent] == [2, 2, 1]


def test_a_full_last_block_is_never_copied():
    bm = manager()
    bm.allocate([0], range(8))
    bm.fork(0, 1)
    assert bm.append_slots(1, [8]) == []   # the new token starts a new block
    assert bm.get_block_table(1)[:2] == bm.get_block_table(0)


def test_the_last_holder_of_a_shared_block_writes_in_place():
    bm = manager()
    bm.allocate([0], range(6))
    bm.fork(0, 1)
    last = bm.get_block_table(0)[1]
    assert len(bm.append_slots(1, [1])) == 1
    assert bm.append_slots(0, [2]) == [] and bm.get_block_table(0)[1] == last


def test_can_append_slots_counts_one_copy_per_extra_sharer():
    bm = manager(num_blocks=3)
    bm.allocate([0, 1, 2], range(6))   # 2 blocks, the last shared by 3 and partly filled
    assert bm.can_append_slots([0], 1)           # 1 copy, 1 free block
    assert not bm.can_append_slots([0, 1], 1)    # 2 copies: seq 2 still holds the block
    bm = manager(num_blocks=4)
    bm.allocate([0, 1, 2], range(6))
    assert bm.can_append_slots([0, 1, 2], 1)     # 2 copies; the third writes in place
    assert not bm.can_append_slots([0, 1, 2], 3)   # ... and then 3 new blocks
    for seq_id in (0, 1, 2):
        bm.append_slots(seq_id, [9])
    assert bm.num_free_blocks == 0 and bm.num_cow_copies == 2


# ---- prefix caching ------------------------------------------------------------------------
def test_hit_on_identical_first_k_full_blocks():
    bm = manager(enable_prefix_caching=True)
    first = computed(bm, 0, list(range(10)))
    bm.allocate([1], list(range(8)) + [50, 51, 52])
    assert bm.num_cached_tokens(1) == 8
    second = bm.get_block_table(1)
    assert second[:2] == first[:2] and second[2] != first[2]
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (2 + 2, 2)


def test_a_fully_cached_prompt_still_recomputes_its_last_token():
    bm = manager(enable_prefix_caching=True)
    first = computed(bm, 0, list(range(8)))
    bm.allocate([1], list(range(8)))
    assert bm.num_cached_tokens(1) == 4   # block 2 holds token 7: it must be computed
    assert bm.get_block_table(1)[0] == first[0] and bm.get_block_table(1)[1] != first[1]
    bm.allocate([2], list(range(9)))
    assert bm.num_cached_tokens(2) == 8


def test_blocks_not_yet_computed_are_never_prefix_hits():
    bm = manager(enable_prefix_caching=True)
    bm.allocate([0], list(range(9)))   # reserved, K/V not written yet
    bm.allocate([1], list(range(9)))
    assert bm.num_cached_tokens(1) == 0
    bm.mark_computed(0, 6)             # a first chunk: only block 0 is full and computed
    bm.allocate([2], list(range(9)))
    assert bm.num_cached_tokens(2) == 4


def test_cached_blocks_outlive_their_sequence_until_evicted():
    bm = manager(enable_prefix_caching=True)
    first = computed(bm, 0, list(range(9)))
    bm.free(0)
    assert bm.num_free_blocks == 8 and bm.prefix_cache.num_evictable == 2
    bm.allocate([1], list(range(9)))
    assert bm.num_cached_tokens(1) == 8 and bm.get_block_table(1)[:2] == first[:2]


def test_lru_eviction_order():
    bm = manager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = computed(bm, "a", [1, 2, 3])[0]
    bm.free("a")
    b = computed(bm, "b", [4, 5, 6])[0]
    bm.free("b")
    assert bm.prefix_cache.evictable_blocks() == [a, b]
    bm.allocate(["c"], [7, 7, 7, 7, 7])   # 3 blocks: the 2 free ones, then evict a
    assert a in bm.get_block_table("c") and b not in bm.get_block_table("c")
    bm.free("c")
    bm.allocate(["d"], [4, 5, 6])
    assert bm.num_cached_tokens("d") == 2


def test_a_revived_block_is_not_evicted():
    bm = manager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = computed(bm, "a", [1, 2, 3])[0]
    bm.free("a")
    b = computed(bm, "b", [4, 5, 6])[0]
    bm.free("b")
    bm.allocate(["a2"], [1, 2, 9])   # a hit revives block a, the least recently used
    assert bm.get_block_table("a2")[0] == a
    bm.allocate(["c"], [7, 7])       # one free block left, then the evictor
    bm.allocate(["e"], [8, 8])
    assert b in bm.get_block_table("e") and bm.get_block_table("a2")[0] == a


def test_a_prompts_tail_is_evicted_before_its_head():
    bm = manager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    blocks = computed(bm, 0, [1, 2, 3, 4, 5, 6])
    bm.free(0)
    assert bm.prefix_cache.evictable_blocks() == blocks[::-1]
    bm.allocate([1], [9, 9, 9])   # 1 free block, then evicts the tail block
    bm.free(1)
    bm.allocate([2], [1, 2, 3, 4, 5, 6, 7])
    assert bm.num_cached_tokens(2) == 4


def test_twin_blocks_computed_at_the_same_time_are_merged():
    bm = manager(enable_prefix_caching=True)
    bm.allocate([0], list(range(9)))
    bm.allocate([1], list(range(9)))   # no hit: nothing is computed yet
    bm.mark_computed(0, 9)
    free_before = bm.num_free_blocks
    bm.mark_computed(1, 9)             # its full blocks are twins of seq 0's: share them
    assert bm.get_block_table(1)[:2] == bm.get_block_table(0)[:2]
    assert bm.num_free_blocks == free_before + 2


def test_a_colliding_hash_never_serves_a_different_prefix():
    bm = manager(num_blocks=12, block_size=2, enable_prefix_caching=True,
                 hash_fn=constant_hash)
    a = computed(bm, "a", [1, 2, 5, 5, 9])
    d = computed(bm, "d", [3, 4, 5, 5, 9])
    assert d[1] != a[1]                   # [5, 5] after [3, 4] is not [5, 5] after [1, 2]
    bm.allocate(["e"], [3, 4, 5, 5, 0])
    assert bm.get_block_table("e")[:2] == d[:2]
    bm.allocate(["f"], [3, 3, 5, 5, 0])
    assert bm.num_cached_tokens("f") == 0


def test_prefix_hits_count_in_favour_of_admission():
    bm = manager(num_blocks=4, enable_prefix_caching=True)
    computed(bm, 0, list(range(9)))     # 3 of 4 blocks
    assert bm.can_allocate(list(range(8)) + [7]) is AllocStatus.OK   # 2 hits + 1 new
    assert bm.can_allocate(list(range(1, 10))) is AllocStatus.LATER


# ---- admission and the watermark -----------------------------------------------------------
def test_the_watermark_refuses_admission_near_full():
    bm = manager(num_blocks=10, watermark=0.2)   # keep 2 blocks free on admission
    bm.allocate([0], range(28))                   # 7 blocks, 3 free
    assert bm.can_allocate(range(4)) is AllocStatus.OK       # leaves 2
    assert bm.can_allocate(range(8)) is AllocStatus.LATER    # would leave 1
    assert bm.can_append_slots([0], 8)   # running sequences may use the watermark


def test_a_prompt_too_big_for_the_device_is_never():
    bm = manager(num_blocks=10, watermark=0.2)
    assert bm.can_allocate(range(33)) is AllocStatus.NEVER   # 9 blocks > 10 - 2
    assert bm.can_allocate(range(32)) is AllocStatus.OK


# ---- swapping (4.5) ------------------------------------------------------------------------
def test_swap_out_then_in_restores_the_tables():
    bm = manager(num_swap_blocks=8)
    bm.allocate([0], range(6))
    bm.fork(0, 1)
    bm.append_slots(1, [6, 7, 8])
    before = {s: bm.get_block_table(s) for s in (0, 1)}
    to_host = dict(bm.swap_out([0, 1]))
    assert bm.num_free_blocks == 8 and bm.num_free_host_blocks == 8 - len(to_host)
    to_device = dict(bm.swap_in([0, 1]))
    for s in (0, 1):   # same structure, through the two copies
        assert bm.get_block_table(s) == [to_device[to_host[b]] for b in before[s]]
    assert bm.num_free_host_blocks == 8
    assert bm.num_swapped_out_blocks == bm.num_swapped_in_blocks == 4   # 1 shared + 1 + 2


def test_a_block_shared_within_a_group_swaps_out_to_one_host_block():
    bm = manager(num_swap_blocks=8)
    bm.allocate([0, 1], range(6))
    pairs = bm.swap_out([0, 1])
    assert len(pairs) == 2
    assert [bm.host.refcount(h) for _, h in pairs] == [2, 2]


def test_swap_out_needs_room_on_the_host():
    bm = manager(num_swap_blocks=1)
    bm.allocate([0], range(6))
    assert not bm.can_swap_out([0])
    with pytest.raises(NoFreeBlocksError):
        bm.swap_out([0])
    assert bm.num_free_blocks == 6 and bm.num_free_host_blocks == 1


def test_can_swap_in_keeps_the_watermark_free_while_others_run():
    bm = manager(num_blocks=10, watermark=0.2, num_swap_blocks=4)
    bm.allocate([0], range(8))     # 2 blocks
    bm.swap_out([0])
    bm.allocate([1], range(20))    # 5 blocks: 5 free
    assert bm.can_swap_in([0])     # 2 blocks + 1 to grow, 2 left for the watermark
    bm.append_slots(1, [0])        # 4 free
    assert not bm.can_swap_in([0])
    bm.free(1)
    assert bm.can_swap_in([0])


def test_swapping_in_reuses_blocks_still_in_the_prefix_cache():
    bm = manager(num_swap_blocks=4, enable_prefix_caching=True)
    before = computed(bm, 0, list(range(9)))
    bm.swap_out([0])   # its device blocks stay cached, evictable
    pairs = bm.swap_in([0])
    table = bm.get_block_table(0)
    assert table[:2] == before[:2]          # shared again, nothing to copy
    assert [d for _, d in pairs] == table[2:] and bm.num_swapped_in_blocks == 1


def test_a_swapped_sequence_can_be_freed_from_the_host():
    bm = manager(num_swap_blocks=4)
    bm.allocate([0], range(6))
    bm.swap_out([0])
    bm.free(0)
    assert bm.num_free_host_blocks == 4 and bm.num_free_blocks == 8


# ---- bad calls -----------------------------------------------------------------------------
@pytest.mark.parametrize("call, argument", [
    (lambda bm: bm.free(42), "seq_id"),
    (lambda bm: bm.fork(42, 43), "seq_id"),
    (lambda bm: bm.fork(0, 0), "seq_id"),
    (lambda bm: bm.append_slots(42, [1]), "seq_id"),
    (lambda bm: bm.get_block_table(42), "seq_id"),
    (lambda bm: bm.num_cached_tokens(42), "seq_id"),
    (lambda bm: bm.allocate([0], [1, 2]), "seq_id"),
    (lambda bm: bm.allocate([5, 5], [1, 2]), "seq_ids"),
    (lambda bm: bm.allocate(5, [1, 2]), "seq_ids"),
    (lambda bm: bm.allocate([5], []), "token_ids"),
    (lambda bm: bm.can_allocate([]), "token_ids"),
    (lambda bm: bm.can_allocate([1], num_seqs=0), "num_seqs"),
    (lambda bm: bm.can_append_slots([0], -1), "num_new_tokens"),
    (lambda bm: bm.mark_computed(0, 5), "num_tokens"),
    (lambda bm: bm.swap_in([0]), "seq_id"),
    (lambda bm: BlockManager(8, 0), "block_size"),
    (lambda bm: BlockManager(0, 4), "num_blocks"),
    (lambda bm: BlockManager(8, 4, num_swap_blocks=-1), "num_swap_blocks"),
    (lambda bm: BlockManager(8, 4, watermark=1.0), "watermark"),
])
def test_bad_calls_raise_value_error_naming_the_argument(call, argument):
    bm = manager(num_swap_blocks=4)
    bm.allocate([0], [1, 2, 3])
    with pytest.raises(ValueError, match=argument):
        call(bm)
    assert bm.get_block_table(0) == [0] and bm.num_free_blocks == 7   # nothing changed


def test_a_swapped_sequence_cannot_grow_until_swapped_in():
    bm = manager(num_swap_blocks=4)
    bm.allocate([0], [1, 2, 3])
    bm.swap_out([0])
    for call in (lambda: bm.append_slots(0, [4]), lambda: bm.mark_computed(0, 1),
                 lambda: bm.swap_out([0])):
        with pytest.raises(ValueError, match="swapped out"):
            call()
