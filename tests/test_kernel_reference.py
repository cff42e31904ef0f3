"""Spec of kernels/reference.py: the executable definitions anchor every other backend.

The literal (token-by-token) and vectorised versions are checked against each other,
and the literal one against hand-computed numbers, so the reference is tied to the math
and not only to itself. Both compute in fp64; tolerances are stated per comparison.
"""

import numpy as np
from hypothesis import given, settings

from minipaged.kernels import reference as ref
from tests.strategies import (
    block_copy_cases,
    cache_write_cases,
    layout_paged,
    paged_attention_cases,
    paged_decode_cases,
)

# The literal reference loops over every (token, head, context position) in Python:
# keep its cases small.
SMALL = dict(max_seqs=3, max_context_len=48, max_tokens=80)


def _prefill(case, literal=False, key_cache=None, value_cache=None, block_tables=None):
    fn = ref.paged_attention_prefill if literal else ref.paged_attention_prefill_vectorized
    return fn(case.query.astype(np.float64),
              case.key_cache if key_cache is None else key_cache,
              case.value_cache if value_cache is None else value_cache,
              case.block_tables if block_tables is None else block_tables,
              case.context_lens, case.query_start_loc, case.scale)


def _used_slots(block_tables, context_lens, num_blocks, block_size):
    used = np.zeros((num_blocks, block_size), dtype=bool)
    for table, n in zip(block_tables, context_lens):
        t = np.arange(n)
        used[table[t // block_size], t % block_size] = True
    return used


# --- anchored to the math --------------------------------------------------------------

def _two_token_cache():
    """Block size 1, blocks shuffled: token 0 lives in block 2, token 1 in block 0."""
    key_cache = np.full((3, 1, 1, 2), np.nan)
    value_cache = np.full((3, 1, 1, 2), np.nan)
    key_cache[2, 0, 0], key_cache[0, 0, 0] = [0.0, 0.0], [np.log(3.0), 0.0]
    value_cache[2, 0, 0], value_cache[0, 0, 0] = [4.0, 0.0], [0.0, 8.0]
    return key_cache, value_cache, np.array([[2, 0]], dtype=np.int32)


def test_decode_of_a_hand_computed_two_token_case():
    # q = [1, 0], scale 1: scores [0, ln 3] -> softmax [1/4, 3/4] -> 1/4 [4, 0] + 3/4 [0, 8]
    key_cache, value_cache, tables = _two_token_cache()
    query = np.array([[[1.0, 0.0]]])
    for fn in (ref.paged_attention_decode, ref.paged_attention_decode_vectorized):
        out = fn(query, key_cache, value_cache, tables, np.array([2]), 1.0)
        np.testing.assert_allclose(out[0, 0], [1.0, 6.0], rtol=0, atol=1e-12)  # fp64 exact-ish


def test_prefill_of_a_hand_computed_two_token_case_is_causal():
    # token 0 sees only itself (its value [4, 0]); token 1 sees both, as in the decode case
    key_cache, value_cache, tables = _two_token_cache()
    query = np.array([[[1.0, 0.0]], [[1.0, 0.0]]])
    for fn in (ref.paged_attention_prefill, ref.paged_attention_prefill_vectorized):
        out = fn(query, key_cache, value_cache, tables, np.array([2]), np.array([0, 2]), 1.0)
        np.testing.assert_allclose(out[:, 0], [[4.0, 0.0], [1.0, 6.0]], rtol=0, atol=1e-12)


def test_query_head_h_reads_kv_head_h_over_group():
    # 4 query heads, 2 KV heads: heads 0, 1 read KV head 0 (values 1), heads 2, 3 KV head 1
    key_cache = np.zeros((1, 2, 2, 3))
    value_cache = np.stack([np.ones((2, 3)), 2 * np.ones((2, 3))], axis=1)[None]  # [1,2,2,3]
    query = np.random.default_rng(0).standard_normal((1, 4, 3))
    for fn in (ref.paged_attention_decode, ref.paged_attention_decode_vectorized):
        out = fn(query, key_cache, value_cache, np.array([[0]]), np.array([2]), 0.5)
        np.testing.assert_allclose(out[0, :, 0], [1.0, 1.0, 2.0, 2.0], rtol=0, atol=1e-12)


# --- the two versions agree ------------------------------------------------------------

@settings(max_examples=30)
@given(paged_decode_cases(**SMALL))
def test_literal_decode_agrees_with_vectorized_decode(case):
    args = (case.query.astype(np.float64), case.key_cache, case.value_cache,
            case.block_tables, case.context_lens, case.scale)
    # both fp64, different summation order: 1e-10
    np.testing.assert_allclose(ref.paged_attention_decode(*args),
                               ref.paged_attention_decode_vectorized(*args), rtol=0, atol=1e-10)


@settings(max_examples=25)
@given(paged_attention_cases(**SMALL))
def test_literal_prefill_agrees_with_vectorized_prefill(case):
    # both fp64, different summation order: 1e-10
    np.testing.assert_allclose(_prefill(case, literal=True), _prefill(case), rtol=0, atol=1e-10)


@settings(max_examples=30)
@given(paged_decode_cases(**SMALL))
def test_decode_equals_prefill_of_one_new_token_per_sequence(case):
    # The literal versions: two separate loops (the vectorised decode *is* a prefill).
    decode = ref.paged_attention_decode(
        case.query.astype(np.float64), case.key_cache, case.value_cache, case.block_tables,
        case.context_lens, case.scale)
    np.testing.assert_allclose(decode, _prefill(case, literal=True), rtol=0,
                               atol=1e-12)                          # same fp64 operations


@settings(max_examples=40)
@given(paged_attention_cases())
def test_output_does_not_depend_on_block_size(case):
    # The same tokens laid out with block size 1, 16 and the drawn one, blocks shuffled.
    rng = np.random.default_rng(0)
    outputs = []
    for block_size in (1, 16, case.block_size):
        key_cache, value_cache, tables = layout_paged(case.keys, case.values, block_size, rng,
                                                      spare_blocks=2)
        outputs.append(_prefill(case, key_cache=key_cache, value_cache=value_cache,
                                block_tables=tables))
    for out in outputs[1:]:
        np.testing.assert_allclose(out, outputs[0], rtol=0, atol=1e-12)   # same fp64 math


@settings(max_examples=40)
@given(paged_attention_cases())
def test_unused_slots_and_table_padding_never_change_an_output(case):
    with_nan = _prefill(case)
    assert np.isfinite(with_nan).all()
    # Replace every unused slot's NaN by huge values, and the table padding by real ids.
    used = _used_slots(case.block_tables, case.context_lens, *case.key_cache.shape[:2])
    rng = np.random.default_rng(1)
    key_cache, value_cache = case.key_cache.copy(), case.value_cache.copy()
    key_cache[~used] = 1e30 * rng.standard_normal(key_cache[~used].shape)
    value_cache[~used] = -1e30
    tables = case.block_tables.copy()
    pages = -(-case.context_lens // case.block_size)
    padding = np.arange(tables.shape[1])[None, :] >= pages[:, None]
    tables[padding] = rng.integers(0, len(key_cache), padding.sum())
    changed = _prefill(case, key_cache=key_cache, value_cache=value_cache, block_tables=tables)
    np.testing.assert_array_equal(changed, with_nan)                # bit for bit


# --- cache writes and block moves ------------------------------------------------------

@given(cache_write_cases())
def test_reshape_and_cache_writes_exactly_the_listed_slots_and_skips_minus_one(case):
    ref.reshape_and_cache(case.key, case.value, case.key_cache, case.value_cache,
                          case.slot_mapping)
    heads, dim = case.key.shape[1:]
    flat_k = case.key_cache.reshape(-1, heads, dim)
    flat_v = case.value_cache.reshape(-1, heads, dim)
    kept = case.slot_mapping >= 0
    np.testing.assert_array_equal(flat_k[case.slot_mapping[kept]], case.key[kept])
    np.testing.assert_array_equal(flat_v[case.slot_mapping[kept]], case.value[kept])
    written = ~np.isnan(flat_k).all(axis=(1, 2))
    assert set(np.flatnonzero(written)) == set(case.slot_mapping[kept].tolist())
    assert (written == ~np.isnan(flat_v).all(axis=(1, 2))).all()


@given(block_copy_cases())
def test_copy_blocks_copies_exactly_the_listed_blocks(case):
    key_before, value_before = case.key_cache.copy(), case.value_cache.copy()
    ref.copy_blocks(case.key_cache, case.value_cache, case.copy_pairs)
    expected_k, expected_v = key_before.copy(), value_before.copy()
    for src, dst in case.copy_pairs:            # no destination is a source: order-free
        expected_k[dst], expected_v[dst] = key_before[src], value_before[src]
    np.testing.assert_array_equal(case.key_cache, expected_k)
    np.testing.assert_array_equal(case.value_cache, expected_v)
    untouched = sorted(set(range(len(key_before))) - {d for _, d in case.copy_pairs})
    np.testing.assert_array_equal(case.key_cache[untouched], key_before[untouched])


@given(block_copy_cases())
def test_swap_blocks_copies_exactly_the_listed_blocks_across_pools(case):
    src_before, dst_before = case.key_cache.copy(), case.dst_cache.copy()
    ref.swap_blocks(case.key_cache, case.dst_cache, case.swap_pairs)
    expected = dst_before.copy()
    for src, dst in case.swap_pairs:
        expected[dst] = src_before[src]
    np.testing.assert_array_equal(case.dst_cache, expected)
    np.testing.assert_array_equal(case.key_cache, src_before)       # the source is unchanged
