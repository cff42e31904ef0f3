"""Spec of the Triton cache operations (kernels/cache_ops.py, paper sections 4.1, 4.4, 4.5).

They only move bits, so every comparison here is exact, bit for bit: caches are compared
through integer views (NaN payloads included), against the NumPy reference run on the
same integer views. Caches start full of NaN (or random data) so that a stray write, or
a missing one, shows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minipaged.kernels import cache_ops
from minipaged.kernels import reference as ref
from tests.strategies import block_copy_cases, cache_write_cases

pytestmark = pytest.mark.triton

dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(tensor: torch.Tensor) -> np.ndarray:
    """The raw bits of a float tensor, as a NumPy integer array (a copy)."""
    return tensor.view(INT_VIEW[tensor.dtype]).numpy().copy()


# ---------------------------------------------------------------------------------------
# reshape_and_cache
# ---------------------------------------------------------------------------------------

@settings(max_examples=40)
@given(case=cache_write_cases(), dtype=dtypes)
def test_reshape_and_cache_writes_exactly_the_listed_slots_and_skips_minus_one(case, dtype):
    key, value = torch.from_numpy(case.key).to(dtype), torch.from_numpy(case.value).to(dtype)
    key_cache = torch.from_numpy(case.key_cache).to(dtype)
    value_cache = torch.from_numpy(case.value_cache).to(dtype)
    expected_k, expected_v = bits(key_cache), bits(value_cache)
    ref.reshape_and_cache(bits(key), bits(value), expected_k, expected_v, case.slot_mapping)

    cache_ops.reshape_and_cache(key, value, key_cache, value_cache,
                                torch.from_numpy(case.slot_mapping))
    np.testing.assert_array_equal(bits(key_cache), expected_k)       # exact
    np.testing.assert_array_equal(bits(value_cache), expected_v)


def test_reshape_and_cache_with_only_padding_slots_changes_nothing():
    key_cache = torch.randn(3, 4, 2, 32)
    value_cache = torch.randn(3, 4, 2, 32)
    before_k, before_v = bits(key_cache), bits(value_cache)
    cache_ops.reshape_and_cache(torch.randn(5, 2, 32), torch.randn(5, 2, 32), key_cache,
                                value_cache, torch.full((5,), -1, dtype=torch.int64))
    np.testing.assert_array_equal(bits(key_cache), before_k)         # exact
    np.testing.assert_array_equal(bits(value_cache), before_v)


def test_reshape_and_cache_reads_key_and_value_from_a_fused_kv_tensor():
    kv = torch.randn(20, 2 * 3 * 24)                   # [tokens, (k | v) heads * dim]
    key, value = kv[:, :72].view(20, 3, 24), kv[:, 72:].view(20, 3, 24)   # strided views
    key_cache = torch.full((4, 8, 3, 24), float("nan"))
    value_cache = key_cache.clone()
    slots = torch.randperm(32, generator=torch.Generator().manual_seed(0))[:20]
    cache_ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
    flat_k, flat_v = key_cache.view(32, 3, 24), value_cache.view(32, 3, 24)
    assert torch.equal(flat_k[slots], key) and torch.equal(flat_v[slots], value)
    unwritten = torch.ones(32, dtype=torch.bool)
    unwritten[slots] = False
    assert flat_k[unwritten].isnan().all() and flat_v[unwritten].isnan().all()


def test_reshape_and_cache_rejects_a_slot_mapping_of_the_wrong_length():
    cache = torch.zeros(2, 4, 1, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        cache_ops.reshape_and_cache(torch.zeros(3, 1, 16), torch.zeros(3, 1, 16), cache,
                                    cache.clone(), torch.zeros(2, dtype=torch.int64))


# ---------------------------------------------------------------------------------------
# copy_blocks (copy-on-write)
# ---------------------------------------------------------------------------------------

@settings(max_examples=30)
@given(case=block_copy_cases(), dtype=dtypes, as_tensor=st.booleans())
def test_copy_blocks_copies_exactly_the_listed_blocks(case, dtype, as_tensor):
    key_cache = torch.from_numpy(case.key_cache).to(dtype)
    value_cache = torch.from_numpy(case.value_cache).to(dtype)
    expected_k, expected_v = bits(key_cache), bits(value_cache)
    ref.copy_blocks(expected_k, expected_v, case.copy_pairs)

    pairs = torch.tensor(case.copy_pairs, dtype=torch.int32) if as_tensor else case.copy_pairs
    cache_ops.copy_blocks(key_cache, value_cache, pairs)
    np.testing.assert_array_equal(bits(key_cache), expected_k)       # exact
    np.testing.assert_array_equal(bits(value_cache), expected_v)


def test_copy_blocks_with_no_pairs_changes_nothing():
    key_cache, value_cache = torch.randn(3, 4, 2, 16), torch.randn(3, 4, 2, 16)
    before_k, before_v = bits(key_cache), bits(value_cache)
    cache_ops.copy_blocks(key_cache, value_cache, [])
    np.testing.assert_array_equal(bits(key_cache), before_k)         # exact
    np.testing.assert_array_equal(bits(value_cache), before_v)


def test_copy_blocks_rejects_a_block_outside_the_pool():
    cache = torch.zeros(3, 4, 1, 16)
    with pytest.raises(ValueError, match="pairs"):
        cache_ops.copy_blocks(cache, cache.clone(), [(0, 3)])


# ---------------------------------------------------------------------------------------
# swap_blocks (device <-> host)
# ---------------------------------------------------------------------------------------

@settings(max_examples=30)
@given(case=block_copy_cases(), dtype=dtypes, use_kernel=st.sampled_from([None, False]))
def test_swap_blocks_copies_exactly_the_listed_blocks(case, dtype, use_kernel):
    # use_kernel=None on two CPU tensors takes the Triton kernel (same device);
    # False takes the indexed copy that a real GPU <-> host swap uses.
    src = torch.from_numpy(case.key_cache).to(dtype)
    dst = torch.from_numpy(case.dst_cache).to(dtype)
    src_before, expected = bits(src), bits(dst)
    ref.swap_blocks(src_before, expected, case.swap_pairs)

    cache_ops.swap_blocks(src, dst, case.swap_pairs, use_kernel=use_kernel)
    np.testing.assert_array_equal(bits(dst), expected)               # exact
    np.testing.assert_array_equal(bits(src), src_before)             # the source is untouched


def test_swap_out_then_swap_in_restores_the_blocks_elsewhere():
    device_cache = torch.randn(6, 4, 2, 32)
    host_cache = torch.full((4, 4, 2, 32), float("nan"))
    original = device_cache[[1, 4]].clone()
    cache_ops.swap_blocks(device_cache, host_cache, [(1, 3), (4, 0)])       # swap out
    device_cache[[1, 4]] = float("nan")                                     # blocks freed, reused
    cache_ops.swap_blocks(host_cache, device_cache, torch.tensor([[3, 5], [0, 2]]))  # swap in
    assert torch.equal(device_cache[[5, 2]], original)


def test_swap_blocks_rejects_caches_of_different_block_shapes():
    with pytest.raises(ValueError, match="same block shape"):
        cache_ops.swap_blocks(torch.zeros(2, 4, 1, 16), torch.zeros(2, 8, 1, 16), [(0, 0)])
