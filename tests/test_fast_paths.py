"""The CPU fast paths added for end-to-end speed keep the results of the plain ones:
length-bucketed paged attention (torch backend) on batches large and ragged enough to be
cut into several buckets, the per-step plan reused across layers, and MKL-packed linear
layers (never used with a stale copy of the weight).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minipaged.attention.buckets import plan_buckets
from minipaged.attention.torch_backend import TorchBackend
from minipaged.kernels import reference as ref
from minipaged.models.layers import Linear, packed_linear
from minipaged.models import packed_linear as packed_linear_module


@settings(max_examples=60)
@given(widths=st.lists(st.integers(1, 40), min_size=1, max_size=80),
       overhead=st.sampled_from([0, 16, 256, 10**9]))
def test_buckets_partition_the_batch_widest_first(widths, overhead):
    widths = np.array(widths)
    buckets = plan_buckets(widths, lambda w: w * 16, overhead)
    members = np.concatenate(buckets)
    assert sorted(members.tolist()) == list(range(len(widths)))      # each exactly once
    tops = [widths[b].max() for b in buckets]
    assert tops == sorted(tops, reverse=True)
    if overhead == 10**9:
        assert len(buckets) == 1                 # a bucket costs more than any padding
    if overhead == 0:
        # free buckets: no sequence is ever padded
        assert all(len(set(widths[b].tolist())) == 1 for b in buckets)


def _ragged_batch(rng, num_seqs, block_size, num_kv_heads, group, decode):
    """A paged batch with log-normal contexts (1..600), shuffled blocks, NaN elsewhere."""
    head_dim = 16
    ctx = np.clip(rng.lognormal(4, 1, num_seqs).astype(int), 1, 600)
    q_len = np.ones(num_seqs, int) if decode else np.where(
        rng.random(num_seqs) < 0.7, ctx, rng.integers(1, ctx + 1))   # some cached prefixes
    blocks = -(-ctx // block_size)
    shape = (int(blocks.sum()) + 3, block_size, num_kv_heads, head_dim)
    key_cache, value_cache = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    perm = rng.permutation(shape[0])
    tables = np.zeros((num_seqs, blocks.max()), np.int32)
    flat_k = key_cache.reshape(-1, num_kv_heads, head_dim)
    flat_v = value_cache.reshape(-1, num_kv_heads, head_dim)
    used = 0
    for i in range(num_seqs):
        tables[i, :blocks[i]] = perm[used:used + blocks[i]]
        used += blocks[i]
        pos = np.arange(ctx[i])
        slots = tables[i, pos // block_size] * block_size + pos % block_size
        flat_k[slots] = rng.standard_normal((ctx[i], num_kv_heads, head_dim))
        flat_v[slots] = rng.standard_normal((ctx[i], num_kv_heads, head_dim))
    starts = np.concatenate(([0], np.cumsum(q_len))).astype(np.int32)
    query = rng.standard_normal((starts[-1], num_kv_heads * group, head_dim)).astype(np.float32)
    return query, key_cache, value_cache, tables, ctx.astype(np.int32), starts


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("seed", range(4))
def test_bucketed_attention_matches_the_reference_on_large_ragged_batches(decode, seed):
    rng = np.random.default_rng(seed)
    block_size = [1, 8, 16, 4][seed]
    q, kc, vc, tables, ctx, starts = _ragged_batch(rng, 48, block_size, 3 - 2 * (seed % 2),
                                                   3, decode)
    expected = ref.paged_attention_prefill_vectorized(
        q.astype(np.float64), kc.astype(np.float64), vc.astype(np.float64), tables, ctx,
        starts, 0.25)
    backend = TorchBackend(c_kernel=False)        # the gather path (the C kernel has none)
    t = torch.from_numpy
    for _layer in range(2):                       # the second call reuses the step's plan
        if decode:
            out = backend.paged_attention_decode(t(q), t(kc), t(vc), t(tables), t(ctx), 0.25)
        else:
            out = backend.paged_attention_prefill(t(q), t(kc), t(vc), t(tables), t(ctx),
                                                  t(starts), 0.25)
        assert torch.isfinite(out).all()
        # fp32 against fp64, outputs |x| <~ 4: measured worst 1.2e-6
        np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)
    plan = backend._plans["decode" if decode else "prefill"][2]
    assert len(plan) > 1                          # the multi-bucket path really ran


@pytest.mark.parametrize("c_kernel", [False, None], ids=["gather", "c-kernel-if-built"])
def test_a_plan_is_rebuilt_when_the_block_tables_change_in_place(c_kernel):
    rng = np.random.default_rng(7)
    q, kc, vc, tables, ctx, _ = _ragged_batch(rng, 6, 4, 1, 2, decode=True)
    backend = TorchBackend(c_kernel=c_kernel)
    tables_t, ctx_t = torch.from_numpy(tables), torch.from_numpy(ctx)
    backend.paged_attention_decode(torch.from_numpy(q), torch.from_numpy(kc),
                                   torch.from_numpy(vc), tables_t, ctx_t, 0.5)
    # Swap two sequences' tables and lengths in place (same tensor objects).
    tables_t[[0, 1]] = tables_t[[1, 0]].clone()
    ctx_t[[0, 1]] = ctx_t[[1, 0]].clone()
    out = backend.paged_attention_decode(torch.from_numpy(q), torch.from_numpy(kc),
                                         torch.from_numpy(vc), tables_t, ctx_t, 0.5)
    expected = ref.paged_attention_prefill_vectorized(
        q.astype(np.float64), kc.astype(np.float64), vc.astype(np.float64), tables_t.numpy(),
        ctx_t.numpy(), np.arange(7, dtype=np.int32), 0.5)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-5)   # fp32 vs fp64


def _assert_fused_linear_equals_f_linear(rows: int) -> None:
    layer = Linear(96, [40, 24], bias=True, dtype=torch.float32)
    g = torch.Generator().manual_seed(rows)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    x = torch.randn(rows, 96, generator=g)
    with torch.inference_mode():
        # |y| ~ 10: a different summation order differs by ~1e-5 in fp32
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 3, 17, 64, 300])
def test_packed_linear_equals_f_linear_at_any_batch_size(rows):
    _assert_fused_linear_equals_f_linear(rows)


def _small_layer_and_input() -> tuple[Linear, torch.Tensor]:
    """A [16 x 32] Linear with random weights (no bias) and 8 input rows."""
    layer = Linear(32, 16, bias=False, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(16, 32))
    return layer, torch.randn(8, 32)


def test_a_changed_weight_is_repacked_before_its_next_use():
    layer, x = _small_layer_and_input()
    with torch.inference_mode():
        layer(x)                                  # packs the first weight
    with torch.no_grad():
        layer.weight.mul_(-2.0)                   # in place, as a test or a user might
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), x @ layer.weight.T, rtol=1e-5, atol=1e-4)
    layer.load_shard(0, "weight", torch.ones(16, 32))     # through .data, like the loader
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), x @ torch.ones(32, 16), rtol=1e-5, atol=1e-4)


def test_packed_linear_falls_back_where_it_cannot_pack():
    w = torch.randn(8, 4, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    holder = torch.nn.Module()
    torch.testing.assert_close(packed_linear(holder, x, w), x @ w.T)      # fp64: F.linear
    assert "_packed_weight" not in holder.__dict__


@pytest.mark.parametrize("library", sorted(packed_linear_module._LIBRARIES))
@pytest.mark.parametrize("rows", [1, 3, 64, 300])
def test_each_packed_gemm_equals_f_linear_at_any_batch_size(library, rows, monkeypatch):
    if not packed_linear_module._works(library):
        pytest.skip(f"{library}'s packed GEMM is not in this torch build")
    monkeypatch.setattr(packed_linear_module, "_CHOICE", library)
    _assert_fused_linear_equals_f_linear(rows)


@pytest.mark.parametrize("wanted", ["mkl", "onednn", "torch"])
def test_minipaged_gemm_picks_the_library(wanted, monkeypatch):
    monkeypatch.setattr(packed_linear_module, "_CHOICE", None)
    monkeypatch.setenv("MINIPAGED_GEMM", wanted)
    works = wanted == "torch" or packed_linear_module._works(wanted)
    assert packed_linear_module.gemm() == (wanted if works else "torch")


def test_without_minipaged_gemm_a_working_library_is_chosen(monkeypatch):
    monkeypatch.setattr(packed_linear_module, "_CHOICE", None)
    monkeypatch.delenv("MINIPAGED_GEMM", raising=False)
    working = [n for n in packed_linear_module._LIBRARIES if packed_linear_module._works(n)]
    assert packed_linear_module.gemm() in (working or ["torch"])


def test_a_bad_minipaged_gemm_raises_value_error_naming_it(monkeypatch):
    monkeypatch.setattr(packed_linear_module, "_CHOICE", None)
    monkeypatch.setenv("MINIPAGED_GEMM", "blas")
    with pytest.raises(ValueError, match="MINIPAGED_GEMM"):
        packed_linear_module.gemm()


def test_a_weight_packed_for_one_library_is_repacked_for_the_other(monkeypatch):
    working = [n for n in sorted(packed_linear_module._LIBRARIES)
               if packed_linear_module._works(n)]
    if len(working) < 2:
        pytest.skip("this torch build has fewer than two packed GEMMs")
    layer, x = _small_layer_and_input()
    for library in working:
        monkeypatch.setattr(packed_linear_module, "_CHOICE", library)
        with torch.inference_mode():
            torch.testing.assert_close(layer(x), x @ layer.weight.T, rtol=1e-5, atol=1e-4)
        assert layer.__dict__["_packed_weight"][2] == library


def test_an_unchanged_weight_is_packed_once_and_reused():
    layer, x = _small_layer_and_input()
    with torch.inference_mode():
        layer(x)
        first = layer.__dict__.get("_packed_weight")
        layer(x)
    if packed_linear_module.gemm() == "torch":
        assert first is None                     # F.linear: nothing packed
    else:
        assert layer.__dict__["_packed_weight"] is first
