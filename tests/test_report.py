"""The memory report: the paper's Fig. 2 categories, counted by hand on small cases."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipaged.core.block_manager import BlockManager
from minipaged.core.contiguous import OrcaMax, OrcaOracle, OrcaPow2
from minipaged.core.memory_map import paged_block_chars, render_memory_map
from minipaged.core.report import MemoryReport, paged_block_fill, report
from tests.strategies import block_sizes, contiguous_report_ops, paged_report_ops


def pow2_arena() -> OrcaPow2:
    """Pow2, 40 slots, max_len 16:
    a(prompt 3, final 5) -> [0, 8); b(2, 9) -> [8, 24); c(1, 1) -> [24, 25); free a;
    b grows by 2 to 4 tokens. Holes: [0, 8) and [25, 40)."""
    alloc = OrcaPow2(capacity=40, max_len=16)
    alloc.allocate("a", 3, 5)
    alloc.allocate("b", 2, 9)
    alloc.allocate("c", 1, 1)
    alloc.free("a")
    alloc.append("b", 2)
    return alloc


def test_contiguous_report_counts_each_category_by_hand():
    rep = report(pow2_arena(), next_reservation=4)
    assert rep.total == 40
    assert rep.token_state == 4 + 1            # b holds 4 tokens, c 1
    assert rep.reserved_unused == (9 - 4) + 0  # b will still grow to 9
    assert rep.internal_fragmentation == (16 - 9) + (1 - 1)   # b's pow2 over-estimate
    assert rep.free == 8 + 15
    assert rep.external_fragmentation == 0     # both holes fit a reservation of 4
    assert rep.num_seqs == 2


def test_holes_smaller_than_the_next_reservation_are_external_fragmentation():
    alloc = pow2_arena()
    assert report(alloc, next_reservation=8).external_fragmentation == 0   # 8 fits in 8
    assert report(alloc, next_reservation=9).external_fragmentation == 8   # only [0,8) fails
    assert report(alloc, next_reservation=16).external_fragmentation == 8 + 15


def test_without_a_next_request_the_mean_live_reservation_decides_external_fragmentation():
    # live reservations 16 and 1: mean 8.5, so the hole of 8 is unusable, 15 is not
    assert report(pow2_arena()).external_fragmentation == 8


def test_an_empty_arena_has_no_external_fragmentation_without_a_next_request():
    rep = report(OrcaMax(capacity=10, max_len=4))
    assert (rep.free, rep.external_fragmentation, rep.utilisation) == (10, 0, 0.0)


def test_utilisation_is_token_state_over_allocated_and_the_paper_share_adds_external():
    rep = report(pow2_arena(), next_reservation=16)
    assert rep.allocated == 40 - 23
    assert rep.utilisation == pytest.approx(5 / 17, abs=1e-12)     # exact fraction
    # the paper's pie: 5 token + 5 reserved + 7 internal + 23 external
    assert rep.paper_utilisation == pytest.approx(5 / 40, abs=1e-12)


def test_orca_max_wastes_the_reservation_beyond_the_final_length_as_internal_fragmentation():
    alloc = OrcaMax(capacity=64, max_len=32)
    alloc.allocate("a", prompt_len=4, final_len=10)
    rep = report(alloc)
    assert (rep.token_state, rep.reserved_unused, rep.internal_fragmentation) == (4, 6, 22)


def test_orca_oracle_has_no_internal_fragmentation():
    alloc = OrcaOracle(capacity=64, max_len=32)
    alloc.allocate("a", prompt_len=4, final_len=10)
    alloc.append("a", 3)
    rep = report(alloc)
    assert (rep.token_state, rep.reserved_unused, rep.internal_fragmentation) == (7, 3, 0)


def test_contiguous_memory_map_draws_each_slot_in_address_order():
    text = render_memory_map(pow2_arena(), width=20, next_reservation=9, legend=False)
    rows = text.splitlines()[1:]
    # [0,8) unusable hole, b: 4 token + 5 reserved + 7 internal, c: 1 token, then free
    assert rows == ["xxxxxxxx####+++++---", "----#..............."]


def test_memory_map_compresses_a_large_arena_and_says_so():
    alloc = OrcaMax(capacity=4096, max_len=1024)
    alloc.allocate("a", 1024, 1024)   # a full reservation: 16 chars of token state
    text = render_memory_map(alloc, width=16, max_rows=4, legend=False)
    head, *rows = text.splitlines()
    assert "1 char = 64 slots" in head            # 4096 / (16 * 4)
    assert rows == ["#" * 16, "." * 16, "." * 16, "." * 16]


# ---- paged ---------------------------------------------------------------------------


def forked_manager() -> BlockManager:
    """8 blocks of 4 slots. Seq 1: 5 tokens (blocks A full, B 1 token). Fork 2 from 1,
    then 2 appends one token: copy-on-write gives 2 its own copy C of B (2 tokens).
    Seq 3: 1 token in block D. A is shared by 1 and 2, counted once."""
    bm = BlockManager(num_blocks=8, block_size=4, watermark=0.0)
    bm.allocate([1], [1, 2, 3, 4, 5])
    bm.fork(1, 2)
    assert bm.append_slots(2, [6]) != []          # the copy-on-write happened
    bm.allocate([3], [7])
    return bm


def test_paged_report_counts_shared_blocks_once_and_the_last_block_tails_as_internal():
    rep = report(forked_manager())
    assert rep.total == 8 * 4
    assert rep.token_state == 4 + 1 + 2 + 1      # A, B, C, D
    assert rep.internal_fragmentation == 3 + 2 + 3   # tails of B, C, D
    assert rep.reserved_unused == 0
    assert rep.external_fragmentation == 0
    assert rep.free == (8 - 4) * 4
    assert rep.utilisation == pytest.approx(8 / 16, abs=1e-12)   # exact fraction


def test_a_fork_without_writes_adds_no_memory_to_the_report():
    bm = BlockManager(num_blocks=4, block_size=4, watermark=0.0)
    bm.allocate([1], [1, 2, 3, 4, 5, 6])
    before = report(bm)
    bm.fork(1, 2)
    after = report(bm)
    assert (after.token_state, after.internal_fragmentation, after.free) == (6, 2, 8)
    assert (before.token_state, before.free) == (after.token_state, after.free)
    assert (before.num_seqs, after.num_seqs) == (1, 2)


def test_paged_memory_map_marks_shared_token_state_and_block_tails():
    bm = forked_manager()
    blocks = paged_block_chars(bm)
    shared, b = bm.get_block_table(1)
    _, c = bm.get_block_table(2)
    (d,) = bm.get_block_table(3)
    assert (blocks[shared], blocks[b], blocks[c], blocks[d]) == ("====", "#---", "##--", "#---")
    assert sorted(blocks).count("....") == 4
    text = render_memory_map(bm, width=20, legend=False)
    assert text.splitlines()[1:] == ["|".join(blocks[:4]), "|".join(blocks[4:])]  # 20 // 5


def test_report_rejects_something_that_is_not_an_allocator():
    with pytest.raises(ValueError, match="allocator"):
        report(object())


def test_a_report_whose_categories_do_not_add_up_is_refused():
    with pytest.raises(ValueError, match="total"):
        MemoryReport(total=10, token_state=3, reserved_unused=0, internal_fragmentation=0,
                     external_fragmentation=0, free=6)


# ---- properties ----------------------------------------------------------------------

@given(block_size=block_sizes, ops=paged_report_ops)
def test_paged_waste_is_at_most_one_partly_filled_block_per_sequence(block_size, ops):
    bm = BlockManager(num_blocks=64, block_size=block_size, watermark=0.0)
    live: list[int] = []
    for i, (op, n) in enumerate(ops):
        if op == "alloc" and bm.num_free_blocks * block_size >= n:
            bm.allocate([i], list(range(n)))
            live.append(i)
        elif op == "append" and live and bm.can_append_slots([live[n % len(live)]], n):
            bm.append_slots(live[n % len(live)], list(range(n)))
        elif op == "fork" and live:
            bm.fork(live[n % len(live)], i)
            live.append(i)
        elif op == "free" and live:
            bm.free(live.pop(n % len(live)))
        rep = report(bm)
        assert rep.total == rep.token_state + rep.internal_fragmentation + rep.free
        assert rep.free == bm.num_free_blocks * block_size
        assert rep.allocated - rep.token_state <= (block_size - 1) * len(live)
        # independently: token state is the distinct cache slots the sequences' tokens
        # map to (a shared block's slots once), allocated the distinct blocks they hold
        slots = {bm.get_block_table(s)[i // block_size] * block_size + i % block_size
                 for s in live for i in range(len(bm.get_token_ids(s)))}
        blocks = set().union(*(bm.get_block_table(s) for s in live))
        if blocks:
            assert rep.utilisation == pytest.approx(len(slots) / (len(blocks) * block_size),
                                                    abs=1e-12)   # same fraction, exact
        # the fast count agrees with the block-by-block picture
        fill, _ = paged_block_fill(bm)
        assert rep.token_state == sum(fill.values())
        assert rep.allocated == len(fill) * block_size


@given(policy=st.sampled_from([OrcaMax, OrcaPow2, OrcaOracle]), ops=contiguous_report_ops,
       next_reservation=st.one_of(st.none(), st.integers(1, 16)))
def test_contiguous_categories_partition_the_arena(policy, ops, next_reservation):
    alloc = policy(capacity=64, max_len=16)
    live: list[int] = []
    for i, (op, a, b) in enumerate(ops):
        if op == "alloc":
            prompt, final = min(a, b) or 1, max(a, b, 1)
            if alloc.can_allocate(prompt, final):
                alloc.allocate(i, prompt, final)
                live.append(i)
        elif op == "append" and live:
            seq = live[a % len(live)]
            alloc.append(seq, min(b, alloc.final_len(seq) - alloc.tokens(seq)))
        elif op == "free" and live:
            alloc.free(live.pop(a % len(live)))
        rep = report(alloc, next_reservation=next_reservation)
        assert rep.token_state == sum(alloc.tokens(s) for s in live)
        assert rep.allocated == alloc.num_reserved
        assert rep.free == alloc.num_free
        assert rep.external_fragmentation <= rep.free
        chars = render_memory_map(alloc, width=64, next_reservation=next_reservation,
                                  legend=False).splitlines()[1]
        assert chars.count("#") == rep.token_state
        assert chars.count("x") == rep.external_fragmentation
