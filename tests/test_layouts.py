"""Spec of kernels/layouts.py: the padded block table and the CSR form say the same thing."""

import numpy as np
import pytest
from hypothesis import given

from minipaged.kernels.layouts import block_table_to_csr, csr_to_block_table
from tests.strategies import padded_block_tables

# The example of the module docstring: B = 4, contexts of 6, 1 and 8 tokens.
EXAMPLE_TABLES = np.array([[7, 2], [5, 0], [0, 3]], dtype=np.int32)
EXAMPLE_LENS = np.array([6, 1, 8], dtype=np.int32)
EXAMPLE_INDPTR = np.array([0, 2, 3, 5], dtype=np.int32)
EXAMPLE_INDICES = np.array([7, 2, 5, 0, 3], dtype=np.int32)
EXAMPLE_LAST_PAGE_LEN = np.array([2, 1, 4], dtype=np.int32)


def test_docstring_example_converts_to_csr():
    indptr, indices, last = block_table_to_csr(EXAMPLE_TABLES, EXAMPLE_LENS, 4)
    np.testing.assert_array_equal(indptr, EXAMPLE_INDPTR)
    np.testing.assert_array_equal(indices, EXAMPLE_INDICES)
    np.testing.assert_array_equal(last, EXAMPLE_LAST_PAGE_LEN)


def test_docstring_example_converts_back_to_block_table():
    tables, lens = csr_to_block_table(EXAMPLE_INDPTR, EXAMPLE_INDICES, EXAMPLE_LAST_PAGE_LEN, 4)
    np.testing.assert_array_equal(tables, EXAMPLE_TABLES)
    np.testing.assert_array_equal(lens, EXAMPLE_LENS)


@given(padded_block_tables())
def test_block_table_round_trips_through_csr_keeping_only_used_entries(layout):
    block_tables, context_lens, block_size = layout
    back, lens = csr_to_block_table(*block_table_to_csr(block_tables, context_lens, block_size),
                                    block_size)
    np.testing.assert_array_equal(lens, context_lens)
    for row, n in enumerate(context_lens):
        pages = -(-int(n) // block_size)
        np.testing.assert_array_equal(back[row, :pages], block_tables[row, :pages])
        assert (back[row, pages:] == 0).all()        # padding is 0, whatever it was before
    assert back.shape[1] == max(-(-int(n) // block_size) for n in context_lens)


@given(padded_block_tables())
def test_csr_round_trips_through_block_table_exactly(layout):
    block_tables, context_lens, block_size = layout
    csr = block_table_to_csr(block_tables, context_lens, block_size)
    again = block_table_to_csr(*csr_to_block_table(*csr, block_size), block_size)
    for a, b in zip(csr, again):
        np.testing.assert_array_equal(a, b)


@given(padded_block_tables())
def test_csr_stores_one_index_per_page_in_use(layout):
    block_tables, context_lens, block_size = layout
    indptr, indices, last = block_table_to_csr(block_tables, context_lens, block_size)
    pages = -(-context_lens.astype(np.int64) // block_size)
    assert len(indices) == pages.sum()
    # context_len = (pages - 1) * B + last_page_len, with 1 <= last_page_len <= B
    np.testing.assert_array_equal(np.where(pages > 0, (pages - 1) * block_size + last, 0),
                                  context_lens)
    assert ((last >= 1) & (last <= block_size))[pages > 0].all()


def test_block_table_too_narrow_for_context_raises():
    with pytest.raises(ValueError, match="block_tables"):
        block_table_to_csr(EXAMPLE_TABLES, np.array([6, 1, 9]), 4)


def test_last_page_len_out_of_range_raises():
    with pytest.raises(ValueError, match="kv_last_page_len"):
        csr_to_block_table(EXAMPLE_INDPTR, EXAMPLE_INDICES, np.array([2, 0, 4]), 4)


def test_indptr_not_matching_indices_raises():
    with pytest.raises(ValueError, match="kv_indptr"):
        csr_to_block_table(np.array([0, 2, 3, 6]), EXAMPLE_INDICES, EXAMPLE_LAST_PAGE_LEN, 4)
