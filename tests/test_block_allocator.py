"""The block allocator: a free list and reference counts (paper sections 4.2 and 4.4).

Example tests name one behaviour each; the state machine drives random allocate / free /
incref / decref sequences against a model that is just an array of reference counts.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from minipaged.core.block_allocator import BlockAllocator, NoFreeBlocksError
from tests.strategies import MEMORY_CORE_STEPS, STATE_MACHINE_EXAMPLES


def test_a_fresh_pool_has_every_block_free():
    pool = BlockAllocator(4)
    assert (pool.num_free, pool.num_used, pool.num_blocks) == (4, 0, 4)
    assert all(pool.is_free(b) and pool.refcount(b) == 0 for b in range(4))


def test_exhaust_then_free():
    pool = BlockAllocator(3)
    blocks = [pool.allocate() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2]
    assert pool.num_free == 0
    with pytest.raises(NoFreeBlocksError, match="device"):
        pool.allocate()
    pool.free(blocks[1])
    assert pool.allocate() == blocks[1]   # the freed block is the only one to give
    for b in blocks:
        pool.free(b)
    assert pool.num_free == 3


def test_double_free_raises():
    pool = BlockAllocator(2)
    block = pool.allocate()
    pool.free(block)
    with pytest.raises(ValueError, match="double free"):
        pool.free(block)
    assert pool.num_free == 2   # the failed free changed nothing


def test_a_shared_block_returns_to_the_free_list_only_at_its_last_free():
    pool = BlockAllocator(2)
    block = pool.allocate()
    pool.incref(block)
    pool.incref(block)
    assert pool.refcount(block) == 3
    pool.free(block)
    pool.free(block)
    assert not pool.is_free(block) and pool.num_free == 1
    pool.free(block)
    assert pool.is_free(block) and pool.num_free == 2


def test_incref_of_a_free_block_raises():
    pool = BlockAllocator(2)
    with pytest.raises(ValueError, match="allocate it"):
        pool.incref(0)


def test_decref_to_zero_parks_a_block_off_the_free_list_until_incref():
    pool = BlockAllocator(2)
    block = pool.allocate()
    assert pool.decref(block) == 0
    assert not pool.is_free(block) and pool.num_free == 1 and pool.num_used == 1
    pool.incref(block)   # back in use, without going through the free list
    assert pool.refcount(block) == 1
    assert pool.decref(block) == 0
    with pytest.raises(ValueError, match="double free"):   # parked is not held
        pool.decref(block)


def test_a_block_outside_the_pool_raises_naming_the_argument():
    pool = BlockAllocator(2, name="host")
    for op in (pool.free, pool.incref, pool.decref, pool.refcount):
        with pytest.raises(ValueError, match="block must be in \\[0, 2\\) for the host pool"):
            op(2)


def test_a_negative_pool_size_raises_naming_the_argument():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(-1)


def test_an_empty_pool_is_allowed_and_always_exhausted():
    pool = BlockAllocator(0, name="host")   # no swap space
    with pytest.raises(NoFreeBlocksError, match="host"):
        pool.allocate()


class AllocatorMachine(RuleBasedStateMachine):
    """Model: one reference count per block, and which zero-count blocks are parked."""

    @initialize(num_blocks=st.integers(0, 8))
    def setup(self, num_blocks):
        self.pool = BlockAllocator(num_blocks)
        self.refs = np.zeros(num_blocks, dtype=np.int64)
        self.parked = np.zeros(num_blocks, dtype=bool)

    def _blocks(self, where):
        return [int(b) for b in np.flatnonzero(where)]

    @rule()
    def allocate(self):
        free = self._blocks((self.refs == 0) & ~self.parked)
        if not free:
            with pytest.raises(NoFreeBlocksError):
                self.pool.allocate()
            return
        block = self.pool.allocate()
        assert block in free   # never a block someone holds or a parked one
        self.refs[block] = 1

    @precondition(lambda self: (self.refs > 0).any())
    @rule(data=st.data())
    def free(self, data):
        block = data.draw(st.sampled_from(self._blocks(self.refs > 0)))
        self.pool.free(block)
        self.refs[block] -= 1

    @precondition(lambda self: ((self.refs > 0) | self.parked).any())
    @rule(data=st.data())
    def incref(self, data):
        block = data.draw(st.sampled_from(self._blocks((self.refs > 0) | self.parked)))
        self.pool.incref(block)
        self.refs[block] += 1
        self.parked[block] = False

    @precondition(lambda self: (self.refs > 0).any())
    @rule(data=st.data())
    def decref(self, data):
        block = data.draw(st.sampled_from(self._blocks(self.refs > 0)))
        self.refs[block] -= 1
        assert self.pool.decref(block) == self.refs[block]
        self.parked[block] = self.refs[block] == 0

    @precondition(lambda self: (self.refs == 0).any())
    @rule(data=st.data())
    def freeing_an_unheld_block_raises(self, data):
        block = data.draw(st.sampled_from(self._blocks(self.refs == 0)))
        with pytest.raises(ValueError):
            self.pool.free(block)
        with pytest.raises(ValueError):
            self.pool.decref(block)

    @precondition(lambda self: ((self.refs == 0) & ~self.parked).any())
    @rule(data=st.data())
    def incref_of_a_free_block_raises(self, data):
        block = data.draw(st.sampled_from(self._blocks((self.refs == 0) & ~self.parked)))
        with pytest.raises(ValueError):
            self.pool.incref(block)

    @invariant()
    def counts_match_the_model(self):
        free = (self.refs == 0) & ~self.parked
        assert self.pool.num_free == int(free.sum())
        assert self.pool.num_free + self.pool.num_used == self.pool.num_blocks
        for b in range(self.pool.num_blocks):
            assert self.pool.refcount(b) == self.refs[b]
            assert self.pool.is_free(b) == free[b]


TestAllocatorStateMachine = AllocatorMachine.TestCase
TestAllocatorStateMachine.settings = settings(max_examples=STATE_MACHINE_EXAMPLES,
                                              stateful_step_count=MEMORY_CORE_STEPS)
