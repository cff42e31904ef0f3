"""Block tables: logical token positions -> physical cache slots (paper section 4.2, Fig. 6)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipaged.core.block_table import BlockTable, distinct_blocks, remap
from tests.strategies import block_sizes


def test_slot_is_the_block_times_block_size_plus_the_offset():
    table = BlockTable(4, blocks=[7, 2, 5], num_tokens=10)
    assert [table.slot(i) for i in (0, 3, 4, 9)] == [28, 31, 8, 21]
    assert table.slots(2, 6) == [30, 31, 8, 9]


@given(block_size=block_sizes, data=st.data())
def test_a_table_of_distinct_blocks_gives_every_token_its_own_slot(block_size, data):
    num_tokens = data.draw(st.integers(1, 40))
    n = -(-num_tokens // block_size)
    blocks = data.draw(st.permutations(range(n + 3)))[:n]
    table = BlockTable(block_size, blocks, num_tokens)
    slots = np.array(table.slots())
    assert len(set(slots.tolist())) == num_tokens
    np.testing.assert_array_equal(slots // block_size, np.repeat(blocks, block_size)[:num_tokens])
    np.testing.assert_array_equal(slots % block_size, np.arange(num_tokens) % block_size)


def test_len_counts_blocks_and_num_empty_slots_counts_room_in_the_last_one():
    table = BlockTable(4, blocks=[0, 1, 2], num_tokens=9)
    assert (len(table), table.num_blocks, table.num_tokens, table.num_empty_slots) == (3, 3, 9, 3)


def test_a_copy_does_not_share_the_block_list():
    table = BlockTable(2, blocks=[3, 4], num_tokens=3)
    copy = table.copy()
    copy.blocks.append(9)
    copy.num_tokens = 5
    assert (table.blocks, table.num_tokens) == ([3, 4], 3)


def test_a_slot_outside_the_sequence_raises_naming_the_argument():
    table = BlockTable(4, blocks=[0], num_tokens=2)
    for i in (-1, 2, 4):
        with pytest.raises(ValueError, match="token index i"):
            table.slot(i)


def test_a_block_size_below_one_raises_naming_the_argument():
    with pytest.raises(ValueError, match="block_size"):
        BlockTable(0)


def test_distinct_blocks_lists_each_block_once_in_first_seen_order():
    tables = [BlockTable(2, [4, 1, 6], 6), BlockTable(2, [4, 1, 3], 5)]
    assert distinct_blocks(tables) == [4, 1, 6, 3]


def test_remap_gives_a_block_shared_by_several_tables_one_new_block():
    tables = [BlockTable(2, [4, 1, 6], 6), BlockTable(2, [4, 1, 3], 5)]
    new_ids, shared, released = iter([10, 11, 12, 13]), [], []
    pairs = remap(tables, lambda: next(new_ids), shared.append, released.append)
    assert pairs == [(4, 10), (1, 11), (6, 12), (3, 13)]
    assert [t.blocks for t in tables] == [[10, 11, 12], [10, 11, 13]]
    assert shared == [10, 11]                  # the second table's references
    assert released == [6, 1, 4, 3, 1, 4]      # every old entry, deepest first per table
