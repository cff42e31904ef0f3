"""Spec of the CPU backends: torch (fast) and numpy (the reference behind the interface).

Every output is compared with kernels/reference.py in fp64 on the *same* inputs after
rounding them to the dtype under test, so a tolerance measures only the backend's own
arithmetic. Outputs are convex combinations of N(0, 1) values (|out| <~ 4), so absolute
tolerances are used; measured worst errors over 150 cases are noted next to each.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minipaged.attention import AttentionMetadata, get_attn_backend
from minipaged.attention.numpy_backend import NumpyBackend
from minipaged.attention.torch_backend import TorchBackend
from minipaged.kernels import reference as ref
from tests.strategies import (
    block_copy_cases,
    cache_write_cases,
    paged_attention_cases,
    paged_decode_cases,
)

# atol per dtype: fp32 measured 1.2e-6; fp16 1.1e-3; bf16 8.8e-3 (its 8-bit mantissa)
ATOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = pytest.mark.parametrize("dtype", list(ATOL), ids=lambda d: str(d).split(".")[1])


def _tensors(case, dtype):
    """The case's float arrays as torch tensors of dtype; index arrays as int32/int64."""
    f = lambda a: torch.from_numpy(a).to(dtype)  # noqa: E731
    return dict(query=f(case.query), key=f(case.key), value=f(case.value),
                key_cache=f(case.key_cache), value_cache=f(case.value_cache),
                block_tables=torch.from_numpy(case.block_tables),
                context_lens=torch.from_numpy(case.context_lens),
                query_start_loc=torch.from_numpy(case.query_start_loc),
                slot_mapping=torch.from_numpy(case.slot_mapping))


def _reference_prefill(case, t):
    """fp64 reference on the dtype-rounded inputs."""
    as64 = lambda x: x.double().numpy()  # noqa: E731
    return ref.paged_attention_prefill_vectorized(
        as64(t["query"]), as64(t["key_cache"]), as64(t["value_cache"]), case.block_tables,
        case.context_lens, case.query_start_loc, case.scale)


def _assert_close(out, expected, atol):
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=atol)


# --- attention against the reference ---------------------------------------------------

@DTYPES
@settings(max_examples=40)
@given(case=paged_decode_cases())
def test_torch_decode_matches_reference(dtype, case):
    # the portable gather + SDPA path (float32 otherwise decodes in C: test_cpu_kernel.py)
    t = _tensors(case, dtype)
    out = TorchBackend(c_kernel=False).paged_attention_decode(t["query"], t["key_cache"], t["value_cache"],
                                                t["block_tables"], t["context_lens"], case.scale)
    assert out.dtype == dtype and out.shape == t["query"].shape
    _assert_close(out, _reference_prefill(case, t), ATOL[dtype])


@DTYPES
@settings(max_examples=25)
@given(case=paged_attention_cases())
def test_torch_prefill_matches_reference(dtype, case):
    t = _tensors(case, dtype)
    out = TorchBackend().paged_attention_prefill(
        t["query"], t["key_cache"], t["value_cache"], t["block_tables"], t["context_lens"],
        t["query_start_loc"], case.scale)
    assert out.dtype == dtype and out.shape == t["query"].shape
    _assert_close(out, _reference_prefill(case, t), ATOL[dtype])


@settings(max_examples=30)
@given(case=st.one_of(paged_decode_cases(), paged_attention_cases()))
def test_torch_forward_writes_new_kv_then_attends(case):
    # The new tokens' slots start out NaN: forward must write them before attending.
    t = _tensors(case, torch.float32)
    expected = _reference_prefill(case, t)
    full_key_cache, full_value_cache = t["key_cache"].clone(), t["value_cache"].clone()
    flat = lambda c: c.view(-1, *c.shape[2:])  # noqa: E731
    flat(t["key_cache"])[t["slot_mapping"]] = float("nan")
    flat(t["value_cache"])[t["slot_mapping"]] = float("nan")
    meta = AttentionMetadata(
        slot_mapping=t["slot_mapping"], block_tables=t["block_tables"],
        context_lens=t["context_lens"], query_start_loc=t["query_start_loc"],
        max_query_len=case.max_query_len, max_context_len=case.max_context_len)
    out = TorchBackend().forward(t["query"], t["key"], t["value"], t["key_cache"],
                                 t["value_cache"], meta, case.scale)
    _assert_close(out, expected, ATOL[torch.float32])
    torch.testing.assert_close(t["key_cache"], full_key_cache, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(t["value_cache"], full_value_cache, equal_nan=True,
                               rtol=0, atol=0)


@settings(max_examples=15)
@given(first=paged_attention_cases(), second=paged_attention_cases())
def test_reused_gather_workspace_never_leaks_between_calls(first, second):
    backend = TorchBackend()                    # one instance, as one engine keeps it
    for case in (first, second):
        t = _tensors(case, torch.float32)
        out = backend.paged_attention_prefill(
            t["query"], t["key_cache"], t["value_cache"], t["block_tables"],
            t["context_lens"], t["query_start_loc"], case.scale)
        _assert_close(out, _reference_prefill(case, t), ATOL[torch.float32])


# --- cache writes and block moves ------------------------------------------------------

# TorchBackend() writes float32 caches in C where the kernel builds; c_kernel=False: torch
BACKENDS = pytest.mark.parametrize(
    "backend", [TorchBackend(), TorchBackend(c_kernel=False), NumpyBackend()],
    ids=["torch", "torch-no-c", "numpy"])


@BACKENDS
@given(case=cache_write_cases())
def test_reshape_and_cache_matches_reference(backend, case):
    key_cache, value_cache = torch.from_numpy(case.key_cache.copy()), torch.from_numpy(
        case.value_cache.copy())
    backend.reshape_and_cache(torch.from_numpy(case.key), torch.from_numpy(case.value),
                              key_cache, value_cache, torch.from_numpy(case.slot_mapping))
    ref.reshape_and_cache(case.key, case.value, case.key_cache, case.value_cache,
                          case.slot_mapping)
    # a copy, not arithmetic: bit-for-bit, NaN where nothing was written
    np.testing.assert_array_equal(key_cache.numpy(), case.key_cache)
    np.testing.assert_array_equal(value_cache.numpy(), case.value_cache)


@BACKENDS
@given(case=block_copy_cases())
def test_copy_blocks_matches_reference(backend, case):
    key_cache, value_cache = (torch.from_numpy(case.key_cache.copy()),
                              torch.from_numpy(case.value_cache.copy()))
    backend.copy_blocks(key_cache, value_cache, case.copy_pairs)
    ref.copy_blocks(case.key_cache, case.value_cache, case.copy_pairs)
    np.testing.assert_array_equal(key_cache.numpy(), case.key_cache)      # bit-for-bit
    np.testing.assert_array_equal(value_cache.numpy(), case.value_cache)


@BACKENDS
@given(case=block_copy_cases())
def test_swap_blocks_matches_reference(backend, case):
    src, dst = torch.from_numpy(case.key_cache.copy()), torch.from_numpy(case.dst_cache.copy())
    backend.swap_blocks(src, dst, case.swap_pairs)
    ref.swap_blocks(case.key_cache, case.dst_cache, case.swap_pairs)
    np.testing.assert_array_equal(dst.numpy(), case.dst_cache)            # bit-for-bit
    np.testing.assert_array_equal(src.numpy(), case.key_cache)


@BACKENDS
def test_empty_copy_and_swap_lists_change_nothing(backend):
    cache = torch.randn(3, 2, 1, 4)
    before = cache.clone()
    backend.copy_blocks(cache, cache, [])
    backend.swap_blocks(cache, cache, [])
    assert torch.equal(cache, before)


# --- the numpy backend: the reference behind the torch interface ------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=["float32", "bfloat16"])   # bf16: no NumPy type, goes via fp32
@settings(max_examples=15)
@given(case=paged_attention_cases(max_seqs=3, max_context_len=40, max_tokens=64))
def test_numpy_backend_forward_equals_reference(dtype, case):
    t = _tensors(case, dtype)
    expected = _reference_prefill(case, t)
    flat = lambda c: c.view(-1, *c.shape[2:])  # noqa: E731
    flat(t["key_cache"])[t["slot_mapping"]] = float("nan")
    flat(t["value_cache"])[t["slot_mapping"]] = float("nan")
    meta = AttentionMetadata(
        slot_mapping=t["slot_mapping"], block_tables=t["block_tables"],
        context_lens=t["context_lens"], query_start_loc=t["query_start_loc"],
        max_query_len=case.max_query_len, max_context_len=case.max_context_len)
    out = NumpyBackend().forward(t["query"], t["key"], t["value"], t["key_cache"],
                                 t["value_cache"], meta, case.scale)
    assert out.dtype == dtype
    # fp64 inside; only the final rounding to dtype: half an ulp of |out| <~ 4
    _assert_close(out, expected, {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype])


# --- choosing a backend ----------------------------------------------------------------

def test_auto_backend_on_cpu_is_torch():
    assert isinstance(get_attn_backend("auto", "cpu"), TorchBackend)
    assert isinstance(get_attn_backend(), TorchBackend)


def test_backends_are_chosen_by_name():
    assert isinstance(get_attn_backend("numpy"), NumpyBackend)
    assert get_attn_backend("torch", torch.device("cpu")).name == "torch"


def test_unknown_backend_name_raises_naming_attention_backend():
    with pytest.raises(ValueError, match="attention_backend") as info:
        get_attn_backend("flash")
    assert "torch" in str(info.value) and "triton" in str(info.value)
