"""The paper's contiguous baselines (section 2.3, Fig. 2/3): Orca (Max), (Pow2), (Oracle)."""

from __future__ import annotations

import pytest

from minipaged.core.contiguous import (
    ContiguousAllocator,
    NoContiguousSpaceError,
    OrcaMax,
    OrcaOracle,
    OrcaPow2,
    ReservationExceededError,
    next_power_of_two,
)


def test_max_reserves_max_len_whatever_the_request_length():
    alloc = OrcaMax(capacity=100, max_len=32)
    assert alloc.reservation_size(prompt_len=3, final_len=5) == 32
    assert alloc.allocate("a", prompt_len=3, final_len=5) == (0, 32)
    assert alloc.reserved("a") == 32


def test_pow2_reserves_the_next_power_of_two_of_the_final_length():
    alloc = OrcaPow2(capacity=100, max_len=32)
    assert alloc.reservation_size(prompt_len=3, final_len=5) == 8
    assert alloc.reservation_size(prompt_len=3, final_len=8) == 8   # already a power of two
    assert alloc.reservation_size(prompt_len=1, final_len=1) == 1
    assert alloc.reservation_size(prompt_len=10, final_len=17) == 32


def test_pow2_reservation_is_capped_at_max_len():
    alloc = OrcaPow2(capacity=100, max_len=24)
    assert alloc.reservation_size(prompt_len=10, final_len=17) == 24   # not 32


def test_oracle_reserves_exactly_the_final_length():
    alloc = OrcaOracle(capacity=100, max_len=32)
    assert alloc.reservation_size(prompt_len=3, final_len=5) == 5
    assert alloc.allocate("a", prompt_len=3, final_len=5) == (0, 5)
    assert alloc.allocate("b", prompt_len=7, final_len=7) == (5, 7)


def test_next_power_of_two_of_small_numbers():
    assert [next_power_of_two(n) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 16]


def test_prompt_state_fills_the_start_of_the_reservation():
    alloc = OrcaMax(capacity=100, max_len=32)
    alloc.allocate("a", prompt_len=3, final_len=5)
    assert alloc.tokens("a") == 3


def test_request_is_refused_when_no_single_hole_fits_though_total_free_space_would():
    # arena of 10: a[0,3) b[3,6) c[6,9) + hole [9,10); free b -> holes [3,6) and [9,10):
    # 4 free slots in total, but no 4 contiguous ones.
    alloc = OrcaOracle(capacity=10, max_len=10)
    for seq in "abc":
        alloc.allocate(seq, prompt_len=1, final_len=3)
    alloc.free("b")
    assert alloc.num_free == 4
    assert alloc.holes() == [(3, 3), (9, 1)]
    assert not alloc.can_allocate(prompt_len=1, final_len=4)
    with pytest.raises(NoContiguousSpaceError, match="no hole of 4"):
        alloc.allocate("d", prompt_len=1, final_len=4)
    assert alloc.holes() == [(3, 3), (9, 1)]   # a refused request changes nothing


def test_first_fit_takes_the_lowest_hole_that_fits_not_the_best_fitting_one():
    alloc = OrcaOracle(capacity=20, max_len=20)
    alloc.allocate("a", 1, 10)   # [0, 10)
    alloc.allocate("b", 1, 2)    # [10, 12)
    alloc.allocate("c", 1, 3)    # [12, 15)
    alloc.allocate("d", 1, 5)    # [15, 20)
    alloc.free("a")
    alloc.free("c")
    assert alloc.holes() == [(0, 10), (12, 3)]
    assert alloc.allocate("e", 1, 3) == (0, 3)   # best fit would pick (12, 3)
    assert alloc.allocate("f", 1, 4) == (3, 4)   # the rest of the first hole
    assert alloc.allocate("g", 1, 3) == (7, 3)
    assert alloc.allocate("h", 1, 3) == (12, 3)
    assert alloc.holes() == []


def test_free_merges_the_region_with_holes_on_both_sides():
    alloc = OrcaOracle(capacity=9, max_len=9)
    for seq in "abc":
        alloc.allocate(seq, 1, 3)
    alloc.free("a")
    alloc.free("c")
    assert alloc.holes() == [(0, 3), (6, 3)]
    alloc.free("b")
    assert alloc.holes() == [(0, 9)]


def test_append_grows_token_state_inside_the_reservation():
    alloc = OrcaMax(capacity=64, max_len=16)
    alloc.allocate("a", prompt_len=3, final_len=6)
    alloc.append("a")
    alloc.append("a", n=2)
    assert alloc.tokens("a") == 6
    assert alloc.reserved("a") == 16


def test_growing_past_the_reservation_raises():
    alloc = OrcaOracle(capacity=64, max_len=16)
    alloc.allocate("a", prompt_len=3, final_len=4)
    alloc.append("a")
    with pytest.raises(ReservationExceededError, match="past its reservation"):
        alloc.append("a")
    assert alloc.tokens("a") == 4


def test_growing_past_the_final_length_inside_a_larger_reservation_raises():
    alloc = OrcaMax(capacity=64, max_len=16)
    alloc.allocate("a", prompt_len=3, final_len=4)
    alloc.append("a")
    with pytest.raises(ValueError, match="final_len"):
        alloc.append("a")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(capacity=0, policy="max", max_len=4), "capacity"),
        (dict(capacity=8, policy="best", max_len=4), "policy"),
        (dict(capacity=8, policy="max", max_len=0), "max_len"),
    ],
)
def test_bad_constructor_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ContiguousAllocator(**kwargs)


@pytest.mark.parametrize(
    ("prompt_len", "final_len", "name"),
    [(0, 3, "prompt_len"), (4, 3, "final_len"), (2, 40, "final_len")],
)
def test_bad_request_lengths_raise_value_error_naming_them(prompt_len, final_len, name):
    alloc = OrcaMax(capacity=64, max_len=32)
    with pytest.raises(ValueError, match=name):
        alloc.allocate("a", prompt_len, final_len)


def test_allocating_the_same_seq_twice_raises():
    alloc = OrcaOracle(capacity=64, max_len=32)
    alloc.allocate("a", 1, 2)
    with pytest.raises(ValueError, match="already allocated"):
        alloc.allocate("a", 1, 2)


def test_freeing_an_unknown_seq_raises_key_error():
    alloc = OrcaOracle(capacity=64, max_len=32)
    with pytest.raises(KeyError):
        alloc.free("nobody")


def test_largest_hole_and_num_free_describe_the_holes():
    alloc = OrcaOracle(capacity=10, max_len=10)
    alloc.allocate("a", 1, 2)
    alloc.allocate("b", 1, 5)
    alloc.free("a")
    assert alloc.holes() == [(0, 2), (7, 3)]
    assert (alloc.num_free, alloc.largest_hole, alloc.num_reserved) == (5, 3, 5)
