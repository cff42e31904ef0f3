"""Spec of the Triton PagedAttention kernels (kernels/paged_attention.py, paper section 4.1).

Every kernel is compared with the NumPy reference (kernels/reference.py, computed in
fp64 from the very values the kernel sees) on hypothesis batches: ragged contexts
(length 1 and exact multiples of the block size included), block sizes 1..32, GQA
ratios 1, 2, 3, 8 and all-to-one, head dims that are not powers of two, shuffled block
tables, and NaN in every slot no sequence owns. All run under TRITON_INTERPRET=1.

Tolerances (absolute and relative, outputs are O(1)):
  fp32  1e-5   fp32 accumulators, exp2 softmax; observed error ~3e-7.
  fp16  5e-3   inputs exact, P rounded to fp16 for P @ V, output rounded (2^-11).
  bf16  3e-2   output rounded to bf16 (2^-8 relative).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minipaged.attention.base import AttentionMetadata
from minipaged.attention.triton_backend import TritonBackend
from minipaged.kernels import paged_attention as pa
from minipaged.kernels import reference as ref
from tests.strategies import (PagedAttentionCase, layout_paged, paged_attention_cases,
                              paged_decode_cases)

pytestmark = pytest.mark.triton

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
half_dtypes = st.sampled_from([torch.float16, torch.bfloat16])


def as_torch(case: PagedAttentionCase, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The case's tensors, floats cast to dtype (NaN stays NaN), indices as given."""
    return dict(
        query=torch.from_numpy(case.query).to(dtype),
        key_cache=torch.from_numpy(case.key_cache).to(dtype),
        value_cache=torch.from_numpy(case.value_cache).to(dtype),
        block_tables=torch.from_numpy(case.block_tables),
        context_lens=torch.from_numpy(case.context_lens),
    )


def reference_prefill(t: dict[str, torch.Tensor], case: PagedAttentionCase) -> np.ndarray:
    """fp64 reference on exactly the (dtype-rounded) values the kernel reads."""
    return ref.paged_attention_prefill_vectorized(
        t["query"].double().numpy(), t["key_cache"].double().numpy(),
        t["value_cache"].double().numpy(), case.block_tables, case.context_lens,
        case.query_start_loc, case.scale)


def assert_close(actual: torch.Tensor, expected: np.ndarray, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    assert actual.dtype == dtype
    np.testing.assert_allclose(actual.double().numpy(), expected, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------

@settings(max_examples=30)
@given(case=paged_decode_cases())
def test_decode_matches_reference_in_fp32(case):
    t = as_torch(case, torch.float32)
    out = pa.paged_attention_decode(**t, scale=case.scale)
    assert_close(out, reference_prefill(t, case), torch.float32)   # 1e-5, see module doc


@settings(max_examples=15)
@given(case=paged_decode_cases(max_seqs=3, max_tokens=200), dtype=half_dtypes)
def test_decode_matches_reference_in_fp16_and_bf16(case, dtype):
    t = as_torch(case, dtype)
    out = pa.paged_attention_decode(**t, scale=case.scale)
    assert_close(out, reference_prefill(t, case), dtype)           # 5e-3 / 3e-2


@settings(max_examples=20)
@given(case=paged_decode_cases(max_seqs=3, max_tokens=300),
       partition_size=st.sampled_from([16, 32, 48, 64]),
       dtype=st.sampled_from([torch.float32, torch.float32, torch.float16]))
def test_split_k_decode_equals_single_pass_decode_and_reference(case, partition_size, dtype):
    t = as_torch(case, dtype)
    split = pa.paged_attention_decode_split_k(**t, scale=case.scale,
                                              partition_size=partition_size)
    single = pa.paged_attention_decode_single_pass(**t, scale=case.scale)
    assert_close(split, reference_prefill(t, case), dtype)
    # The two kernels differ only in the order of fp32 additions (and, for fp16, in
    # where P is rounded): same tolerance as against the reference.
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(split, single, atol=tol, rtol=tol)


def test_decode_of_few_long_sequences_takes_the_split_k_path(monkeypatch):
    calls = []
    real = pa.paged_attention_decode_split_k
    monkeypatch.setattr(pa, "paged_attention_decode_split_k",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(0)
    context = 2 * pa.DEFAULT_PARTITION_SIZE + 40            # three partitions, one ragged
    keys = [rng.standard_normal((context, 1, 32)).astype(np.float32)]
    values = [rng.standard_normal((context, 1, 32)).astype(np.float32)]
    key_cache, value_cache, tables = layout_paged(keys, values, 32, rng)
    query = rng.standard_normal((1, 2, 32)).astype(np.float32)
    lens = np.array([context], dtype=np.int32)
    out = pa.paged_attention_decode(torch.from_numpy(query), torch.from_numpy(key_cache),
                                    torch.from_numpy(value_cache), torch.from_numpy(tables),
                                    torch.from_numpy(lens), 32 ** -0.5)
    assert calls == [1]
    expected = ref.paged_attention_decode_vectorized(query, key_cache, value_cache, tables,
                                                     lens, 32 ** -0.5)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5, rtol=1e-5)   # fp32


def test_split_k_heuristic_splits_only_few_long_sequences():
    assert pa.use_split_k(num_seqs=1, num_kv_heads=2, max_context_len=4096)
    assert not pa.use_split_k(num_seqs=1, num_kv_heads=2, max_context_len=256)
    assert not pa.use_split_k(num_seqs=64, num_kv_heads=8, max_context_len=4096)


# ---------------------------------------------------------------------------------------
# Prefill
# ---------------------------------------------------------------------------------------

@settings(max_examples=25)
@given(case=paged_attention_cases(max_seqs=3, max_tokens=250))
def test_prefill_matches_reference_in_fp32(case):
    t = as_torch(case, torch.float32)
    out = pa.paged_attention_prefill(**t, query_start_loc=torch.from_numpy(case.query_start_loc),
                                     scale=case.scale, max_query_len=case.max_query_len)
    assert_close(out, reference_prefill(t, case), torch.float32)   # 1e-5


@settings(max_examples=12)
@given(case=paged_attention_cases(max_seqs=2, max_tokens=150), dtype=half_dtypes)
def test_prefill_matches_reference_in_fp16_and_bf16(case, dtype):
    t = as_torch(case, dtype)
    out = pa.paged_attention_prefill(**t, query_start_loc=torch.from_numpy(case.query_start_loc),
                                     scale=case.scale)                 # max_query_len read
    assert_close(out, reference_prefill(t, case), dtype)              # 5e-3 / 3e-2


@settings(max_examples=15)
@given(case=paged_decode_cases(max_seqs=3, max_tokens=200))
def test_decode_equals_prefill_of_a_single_new_token(case):
    t = as_torch(case, torch.float32)
    decode = pa.paged_attention_decode(**t, scale=case.scale)
    prefill = pa.paged_attention_prefill(**t, scale=case.scale,
                                         query_start_loc=torch.from_numpy(case.query_start_loc))
    # Same tiles, same order of additions: equal up to fp32 rounding of the tile shapes.
    torch.testing.assert_close(decode, prefill, atol=1e-6, rtol=1e-6)


@settings(max_examples=15)
@given(case=paged_attention_cases(max_seqs=2, max_tokens=120, block_sizes=st.just(16)),
       other_block_size=st.sampled_from([1, 2, 4, 8, 32, 12]))  # 12: not a power of 2
def test_output_does_not_depend_on_the_block_size(case, other_block_size):
    t = as_torch(case, torch.float32)
    qsl = torch.from_numpy(case.query_start_loc)
    out = pa.paged_attention_prefill(**t, query_start_loc=qsl, scale=case.scale)
    rng = np.random.default_rng(other_block_size)
    key_cache, value_cache, tables = layout_paged(case.keys, case.values, other_block_size, rng)
    out_other = pa.paged_attention_prefill(t["query"], torch.from_numpy(key_cache),
                                           torch.from_numpy(value_cache),
                                           torch.from_numpy(tables), t["context_lens"], qsl,
                                           case.scale)
    # Tiles hold different tokens per block size, so only the fp32 summation order
    # changes: 1e-5 as against the reference.
    torch.testing.assert_close(out, out_other, atol=1e-5, rtol=1e-5)


def test_padding_entries_of_the_block_table_are_never_read():
    rng = np.random.default_rng(1)
    lens = np.array([5, 16, 1], dtype=np.int32)          # block size 4: ragged, full, one
    keys = [rng.standard_normal((n, 2, 40)).astype(np.float32) for n in lens]
    values = [rng.standard_normal((n, 2, 40)).astype(np.float32) for n in lens]
    key_cache, value_cache, tables = layout_paged(keys, values, 4, rng, spare_blocks=1,
                                                  pad_columns=3)
    used = np.arange(tables.shape[1])[None, :] < -(-lens[:, None] // 4)
    (spare,) = set(range(len(key_cache))) - set(tables[used].tolist())
    # Relabel so that the spare block is block 0, the id the padding (and any masked
    # table load) points at; then fill it with inf keys and NaN values.
    for cache in (key_cache, value_cache):
        cache[[0, spare]] = cache[[spare, 0]]
    tables[used] = np.where(tables[used] == 0, spare, tables[used])
    tables[~used] = 0
    key_cache[0], value_cache[0] = np.inf, np.nan
    query = rng.standard_normal((3, 4, 40)).astype(np.float32)
    out = pa.paged_attention_decode(torch.from_numpy(query), torch.from_numpy(key_cache),
                                    torch.from_numpy(value_cache), torch.from_numpy(tables),
                                    torch.from_numpy(lens), 0.1)
    expected = ref.paged_attention_decode(query, key_cache, value_cache, tables, lens, 0.1)
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5, rtol=1e-5)   # fp32


def test_query_may_be_a_strided_view_of_a_fused_qkv_tensor():
    rng = np.random.default_rng(2)
    keys = [rng.standard_normal((n, 1, 32)).astype(np.float32) for n in (7, 20)]
    values = [rng.standard_normal((n, 1, 32)).astype(np.float32) for n in (7, 20)]
    key_cache, value_cache, tables = layout_paged(keys, values, 8, rng)
    qkv = torch.randn(4, 3 * 96, generator=torch.Generator().manual_seed(0))
    query = qkv[:, :96].view(4, 3, 32)              # rows 288 apart: not contiguous
    lens = torch.tensor([7, 20], dtype=torch.int32)
    qsl = torch.tensor([0, 1, 4], dtype=torch.int32)
    out = pa.paged_attention_prefill(query, torch.from_numpy(key_cache),
                                     torch.from_numpy(value_cache), torch.from_numpy(tables),
                                     lens, qsl, 0.2)
    expected = ref.paged_attention_prefill(query.numpy(), key_cache, value_cache, tables,
                                           lens.numpy(), qsl.numpy(), 0.2)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5, rtol=1e-5)   # fp32


@pytest.mark.parametrize("bad, message", [
    (dict(query=torch.zeros(2, 3, 32)), "num_kv_heads"),
    (dict(key_cache=torch.zeros(4, 8, 2, 16), value_cache=torch.zeros(4, 8, 2, 16)),
     "head_dim"),
    (dict(context_lens=torch.ones(3, dtype=torch.int32)), "context_lens"),
    (dict(block_tables=torch.zeros(3, 2, dtype=torch.int32)), "block_tables"),
    (dict(query=torch.zeros(2, 4, 32, dtype=torch.float16)), "dtype"),
])
def test_bad_shapes_raise_value_error_naming_the_argument(bad, message):
    args = dict(query=torch.zeros(2, 4, 32), key_cache=torch.zeros(4, 8, 2, 32),
                value_cache=torch.zeros(4, 8, 2, 32),
                block_tables=torch.zeros(2, 2, dtype=torch.int32),
                context_lens=torch.ones(2, dtype=torch.int32))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        pa.paged_attention_decode(**args, scale=1.0)


# ---------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------

@settings(max_examples=10)
@given(case=paged_attention_cases(max_seqs=3, max_tokens=150))
def test_triton_backend_forward_writes_the_new_tokens_then_attends(case):
    t = as_torch(case, torch.float32)
    slots = torch.from_numpy(case.slot_mapping)
    # Blank the new tokens' slots: forward must write them before attending.
    for cache in (t["key_cache"], t["value_cache"]):
        flat = cache.view(-1, *cache.shape[2:])
        flat[slots] = float("nan")
    meta = AttentionMetadata(slot_mapping=slots, block_tables=t["block_tables"],
                             context_lens=t["context_lens"],
                             query_start_loc=torch.from_numpy(case.query_start_loc),
                             max_query_len=case.max_query_len,
                             max_context_len=case.max_context_len)
    backend = TritonBackend()
    out = backend.forward(t["query"], torch.from_numpy(case.key), torch.from_numpy(case.value),
                          t["key_cache"], t["value_cache"], meta, case.scale)
    expected = ref.paged_attention_prefill_vectorized(
        case.query, case.key_cache, case.value_cache, case.block_tables, case.context_lens,
        case.query_start_loc, case.scale)
    assert backend.name == "triton"
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5, rtol=1e-5)   # fp32
