"""Random allocate / append / free through the contiguous baselines, checked against a
naive NumPy model of the arena (one owner id per slot, -1 = free).

The model finds first fit by scanning the slot array, so the allocator's hole lists,
bisects and merges are checked against the plainest possible definition.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from minipaged.core.contiguous import ContiguousAllocator, NoContiguousSpaceError
from tests.strategies import STATE_MACHINE_EXAMPLES, contiguous_policies

FREE = -1


def first_fit(owner: np.ndarray, size: int) -> int | None:
    """The start of the lowest free run of at least ``size`` slots (first fit)."""
    return next((start for start, run in free_runs(owner) if run >= size), None)


def free_runs(owner: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of free slots as (start, size): what the holes must be."""
    runs, start = [], None
    for i, o in enumerate([*owner.tolist(), 0]):   # sentinel closes a trailing run
        if o == FREE and start is None:
            start = i
        elif o != FREE and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


class ContiguousMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    @initialize(
        policy=contiguous_policies,
        max_len=st.integers(1, 24),
        extra=st.integers(0, 72),
    )
    def setup(self, policy, max_len, extra):
        self.alloc = ContiguousAllocator(max_len + extra, policy, max_len)
        self.owner = np.full(max_len + extra, FREE)
        self.model: dict[int, dict] = {}   # seq -> start, size, length, final
        self.next_id = 0

    @rule(target=seqs, data=st.data())
    def allocate(self, data):
        max_len = self.alloc.max_len
        final = data.draw(st.integers(1, max_len), label="final_len")
        prompt = data.draw(st.integers(1, final), label="prompt_len")
        size = self.alloc.reservation_size(prompt, final)
        expected = first_fit(self.owner, size)
        seq = self.next_id
        self.next_id += 1
        if expected is None:
            with pytest.raises(NoContiguousSpaceError):
                self.alloc.allocate(seq, prompt, final)
            return multiple()   # refused: nothing joins the bundle
        start, got_size = self.alloc.allocate(seq, prompt, final)
        assert (start, got_size) == (expected, size)
        self.owner[start : start + size] = seq
        self.model[seq] = dict(start=start, size=size, length=prompt, final=final)
        return seq

    @rule(seq=seqs, n=st.integers(0, 6))
    def append(self, seq, n):
        if seq not in self.model:   # freed by free_everything
            return
        m = self.model[seq]
        if m["length"] + n > m["final"]:
            with pytest.raises(ValueError):
                self.alloc.append(seq, n)
        else:
            self.alloc.append(seq, n)
            m["length"] += n
        assert self.alloc.tokens(seq) == m["length"]

    @rule(seq=consumes(seqs))
    def free(self, seq):
        if seq not in self.model:
            return
        self.alloc.free(seq)
        m = self.model.pop(seq)
        self.owner[m["start"] : m["start"] + m["size"]] = FREE

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def free_everything_gives_one_hole_of_the_whole_arena(self):
        for seq in list(self.model):
            self.alloc.free(seq)
            del self.model[seq]
        self.owner[:] = FREE
        assert self.alloc.holes() == [(0, self.alloc.capacity)]

    @invariant()
    def reservations_are_where_the_model_put_them_and_never_overlap(self):
        regions = self.alloc.regions()
        assert set(regions) == set(self.model)
        owner = np.full(self.alloc.capacity, FREE)
        for seq, r in regions.items():
            assert np.all(owner[r.start : r.end] == FREE), "two reservations overlap"
            owner[r.start : r.end] = seq
        assert np.array_equal(owner, self.owner)

    @invariant()
    def free_plus_reserved_is_capacity(self):
        assert self.alloc.num_free + self.alloc.num_reserved == self.alloc.capacity
        assert self.alloc.num_free == int(np.sum(self.owner == FREE))

    @invariant()
    def holes_are_the_maximal_free_runs_so_adjacent_holes_are_merged(self):
        assert self.alloc.holes() == free_runs(self.owner)
        assert self.alloc.largest_hole == max((s for _, s in free_runs(self.owner)), default=0)

    @invariant()
    def token_state_never_passes_the_reservation(self):
        for seq, m in self.model.items():
            assert self.alloc.tokens(seq) <= m["final"] <= self.alloc.reserved(seq)


ContiguousMachine.TestCase.settings = settings(max_examples=STATE_MACHINE_EXAMPLES)
test_contiguous_allocator_state_machine = ContiguousMachine.TestCase
