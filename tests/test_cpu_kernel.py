"""Spec of the C attention kernels (kernels/cpu_paged_attention.c for decode,
kernels/cpu_paged_prefill.c for prompts), of the C layer ops, and of when the torch
backend uses them.

The kernel is held to kernels/reference.py in fp64 on the same float32 inputs, on the
shared random paged batches (shuffled blocks, ragged contexts, GQA ratios 1-16, NaN in
every slot no sequence owns), so reading one byte past a context fails the test.
Tolerance: atol 1e-5 (outputs are convex combinations of N(0, 1) values; fp32
accumulation in another order than the reference; measured worst 1e-6).
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minipaged.attention.torch_backend import TorchBackend
from minipaged.kernels import cpu_build, cpu_kernel, cpu_layers
from minipaged.kernels import reference as ref
from tests.strategies import paged_attention_cases, paged_decode_cases

ATOL = 1e-5

needs_kernel = pytest.mark.skipif(cpu_build.load() is None,
                                  reason="no C compiler here: the torch path is tested alone")


def _inputs(case):
    return (torch.from_numpy(case.query), torch.from_numpy(case.key_cache),
            torch.from_numpy(case.value_cache), torch.from_numpy(case.block_tables),
            torch.from_numpy(case.context_lens))


def _expected(case):
    return ref.paged_attention_prefill_vectorized(
        case.query.astype(np.float64), case.key_cache.astype(np.float64),
        case.value_cache.astype(np.float64), case.block_tables, case.context_lens,
        case.query_start_loc, case.scale)


@needs_kernel
@settings(max_examples=60)
@given(case=paged_decode_cases(max_seqs=6, max_context_len=300, max_tokens=900))
def test_c_decode_kernel_matches_the_reference(case):
    out = cpu_kernel.paged_attention_decode(*_inputs(case), case.scale)
    assert out.shape == case.query.shape and torch.isfinite(out).all()
    np.testing.assert_allclose(out.double().numpy(), _expected(case), rtol=0, atol=ATOL)


@needs_kernel
@settings(max_examples=30)
@given(case=paged_decode_cases())
def test_torch_backend_decodes_through_the_c_kernel_and_agrees_with_its_gather_path(case):
    fast = TorchBackend().paged_attention_decode(*_inputs(case), case.scale)
    gathered = TorchBackend(c_kernel=False).paged_attention_decode(*_inputs(case), case.scale)
    # two fp32 summation orders of the same math
    torch.testing.assert_close(fast, gathered, rtol=0, atol=ATOL)


def _prefill_inputs(case):
    return (torch.from_numpy(case.query), torch.from_numpy(case.key_cache),
            torch.from_numpy(case.value_cache), torch.from_numpy(case.block_tables),
            torch.from_numpy(case.context_lens), torch.from_numpy(case.query_start_loc))


needs_prefill = pytest.mark.skipif(cpu_build.load("cpu_paged_prefill") is None,
                                   reason="no C compiler here: the torch path is tested alone")


@needs_prefill
@settings(max_examples=60)
@given(case=paged_attention_cases(max_seqs=5, max_context_len=300, max_tokens=700))
def test_c_prefill_kernel_matches_the_reference(case):
    out = cpu_kernel.paged_attention_prefill(*_prefill_inputs(case), case.scale)
    group = case.query.shape[1] // case.key_cache.shape[2]
    if 48 % group:
        assert out is None               # declined: the torch path takes this head layout
        return
    assert out.shape == case.query.shape and torch.isfinite(out).all()
    np.testing.assert_allclose(out.double().numpy(), _expected(case), rtol=0, atol=ATOL)


@needs_prefill
@settings(max_examples=15)
@given(case=paged_attention_cases(max_seqs=3, max_context_len=120, max_tokens=200,
                                  head_dims=st.just(128)))
def test_c_prefill_kernel_matches_the_reference_at_head_dim_128(case):
    # head_dim 128 has its own loop bounds in the kernel (3 rows of 8 vectors at a time)
    out = cpu_kernel.paged_attention_prefill(*_prefill_inputs(case), case.scale)
    if 48 % (case.query.shape[1] // case.key_cache.shape[2]):
        assert out is None
        return
    np.testing.assert_allclose(out.double().numpy(), _expected(case), rtol=0, atol=ATOL)


@needs_prefill
@settings(max_examples=30)
@given(case=paged_attention_cases())
def test_torch_backend_prefills_through_the_c_kernel_and_agrees_with_its_gather_path(case):
    fast = TorchBackend().paged_attention_prefill(*_prefill_inputs(case), case.scale)
    gathered = TorchBackend(c_kernel=False).paged_attention_prefill(*_prefill_inputs(case),
                                                                    case.scale)
    torch.testing.assert_close(fast, gathered, rtol=0, atol=ATOL)   # two fp32 orders


@needs_prefill
def test_c_prefill_refuses_query_runs_that_do_not_fit_their_contexts():
    q, kc = torch.randn(5, 4, 16), torch.randn(3, 4, 2, 16)
    tables, lens = torch.tensor([[0, 1], [2, 0]]), torch.tensor([5, 3])
    for starts in ([0, 1, 5], [0, 3, 6], [0, 5, 5], [1, 2, 5]):    # 4 > 3, past T, empty, ...
        with pytest.raises(ValueError, match="query_start_loc"):
            cpu_kernel.paged_attention_prefill(q, kc, kc, tables, lens,
                                               torch.tensor(starts), 1.0)


@needs_kernel
def test_the_torch_backend_calls_the_kernel_for_float32_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kernel, "paged_attention_decode",
                        lambda *a: calls.append(a) or torch.zeros_like(a[0]))
    q, kc, vc = torch.randn(2, 4, 16), torch.randn(3, 4, 2, 16), torch.randn(3, 4, 2, 16)
    tables, lens = torch.tensor([[0, 1], [2, 0]]), torch.tensor([5, 3])
    TorchBackend().paged_attention_decode(q, kc, vc, tables, lens, 0.25)
    assert len(calls) == 1
    TorchBackend().paged_attention_decode(q.half(), kc.half(), vc.half(), tables, lens, 0.25)
    TorchBackend(c_kernel=False).paged_attention_decode(q, kc, vc, tables, lens, 0.25)
    assert len(calls) == 1            # half precision and c_kernel=False: the gather path


def test_the_kernel_only_claims_float32_contiguous_caches_with_a_head_dim_of_eights():
    q, kc = torch.randn(2, 4, 16), torch.randn(3, 4, 2, 16)
    assert cpu_kernel.supports(q, kc, kc.clone())
    assert not cpu_kernel.supports(q, kc.half(), kc.half())
    assert not cpu_kernel.supports(q, kc.transpose(1, 2), kc.transpose(1, 2))
    odd = torch.randn(3, 4, 2, 12)
    assert not cpu_kernel.supports(torch.randn(2, 4, 12), odd, odd)


def test_switching_the_kernel_off_by_environment_leaves_the_gather_path(monkeypatch):
    monkeypatch.setenv(cpu_build.ENV_SWITCH, "0")
    assert cpu_build.load() is None
    q, kc, vc = torch.randn(1, 2, 8), torch.randn(2, 4, 1, 8), torch.randn(2, 4, 1, 8)
    out = TorchBackend().paged_attention_decode(q, kc, vc, torch.tensor([[1]]),
                                                torch.tensor([3]), 0.5)
    scores = torch.einsum("hd,td->ht", q[0], kc[1, :3, 0]) * 0.5
    expected = torch.softmax(scores, -1) @ vc[1, :3, 0]
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-6)


@needs_kernel
def test_the_build_is_cached_by_source_flags_and_compiler():
    compiler = cpu_build._compiler()
    first = cpu_build.build(compiler)
    assert cpu_build.build(compiler) == first and first.exists()


@needs_kernel
def test_bad_calls_are_refused_before_any_pointer_is_passed():
    q, kc = torch.randn(2, 4, 16), torch.randn(3, 4, 2, 16)
    with pytest.raises(ValueError, match="block outside the cache"):
        cpu_kernel.paged_attention_decode(q, kc, kc, torch.tensor([[0, 7], [1, 0]]),
                                          torch.tensor([5, 3]), 1.0)
    with pytest.raises(ValueError, match="1 .. table width"):
        cpu_kernel.paged_attention_decode(q, kc, kc, torch.tensor([[0], [1]]),
                                          torch.tensor([5, 3]), 1.0)
    with pytest.raises(ValueError, match="one row per sequence"):
        cpu_kernel.paged_attention_decode(q, kc, kc, torch.tensor([[0, 1]]),
                                          torch.tensor([5, 3]), 1.0)


# --- the layer ops (kernels/cpu_layers.c) ----------------------------------------------

needs_layers = pytest.mark.skipif(cpu_build.load("cpu_layers") is None,
                                  reason="no C compiler here: the torch path is tested alone")


def _torch_rms_norm(x, weight, eps):
    """transformers' LlamaRMSNorm, in float64 (the exact value both sides round)."""
    x64 = x.double()
    return weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)


@needs_layers
@pytest.mark.parametrize("rows,size", [(1, 8), (7, 576), (64, 576), (3, 100)])
def test_c_rms_norm_matches_the_float64_norm(rows, size):
    g = torch.Generator().manual_seed(rows * size)
    x, weight = torch.randn(rows, size, generator=g) * 3, torch.randn(size, generator=g)
    out = cpu_layers.rms_norm(x, weight, 1e-5)
    # float32 against float64 of the same inputs, |out| <~ 10: measured worst 1e-6
    torch.testing.assert_close(out.double(), _torch_rms_norm(x, weight, 1e-5),
                               rtol=0, atol=1e-5)


@needs_layers
def test_c_rms_norm_with_a_residual_adds_it_in_place_first():
    g = torch.Generator().manual_seed(0)
    x, residual, weight = (torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g),
                           torch.randn(64, generator=g))
    total = residual + x                              # one float32 add: exact on both sides
    out = cpu_layers.rms_norm(x, weight, 1e-6, residual)
    assert torch.equal(residual, total)
    torch.testing.assert_close(out.double(), _torch_rms_norm(total, weight, 1e-6),
                               rtol=0, atol=1e-5)     # as above


@needs_layers
def test_c_rotary_is_bit_identical_to_the_torch_rotation():
    from minipaged.models.config import ModelConfig
    from minipaged.models.layers import RotaryEmbedding

    config = ModelConfig(architecture="llama", vocab_size=10, hidden_size=64, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=8,
                         max_position_embeddings=256)
    rope = RotaryEmbedding(config, torch.float32)
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(9, 8 * 16, generator=g)      # fused rows: q, k, v of 4 + 2 + 2 heads
    positions = torch.randint(0, 256, (9,), generator=g)
    qk_c, qk_torch = qkv.clone(), qkv.clone()
    cos, sin = rope.table(positions)
    assert cpu_layers.rotary_(qk_c[:, :96].view(9, 6, 16), cos.squeeze(1), sin.squeeze(1))
    cpu_build._libs["cpu_layers"], saved = None, cpu_build._libs["cpu_layers"]
    try:
        rope((cos, sin), qk_torch[:, :96].view(9, 6, 16))      # the torch path
    finally:
        cpu_build._libs["cpu_layers"] = saved
    assert torch.equal(qk_c, qk_torch)                 # same roundings, v untouched


@needs_layers
@pytest.mark.parametrize("rows,n", [(1, 1), (3, 15), (5, 33), (64, 1536)])
def test_c_silu_mul_matches_torch_silu_times_up(rows, n):
    g = torch.Generator().manual_seed(rows + n)
    gate_up = torch.randn(rows, 2 * n, generator=g) * 6
    out = cpu_layers.silu_mul(gate_up)
    expected = torch.nn.functional.silu(gate_up[:, :n]) * gate_up[:, n:]
    assert out.is_contiguous() and out.shape == (rows, n)
    # two float32 exponentials (torch's and the C file's, ~1 ulp each), then a divide
    # and a multiply: measured worst 2.6e-7 relative
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-30)


@needs_layers
def test_c_silu_mul_keeps_torch_values_at_the_edges_and_reads_rows_apart():
    edges = torch.tensor([-100.0, 100.0, 0.0, -0.0, float("inf"), -float("inf"), 88.9, -88.9])
    wide = torch.ones(2, 20)
    wide[:, :8] = edges                      # rows of 20 floats: gate 8, up 8, 4 unused
    out = cpu_layers.silu_mul(wide[:, :16])
    expected = torch.nn.functional.silu(edges)
    for row in out:                          # -0.0 and nan where torch has them
        assert torch.equal(row.isnan(), expected.isnan())
        assert torch.equal(row[~row.isnan()], expected[~expected.isnan()])
        assert torch.equal(row.signbit(), expected.signbit())


def test_layer_ops_decline_what_they_were_not_written_for():
    x = torch.randn(4, 16)
    assert cpu_layers.rms_norm(x.half(), torch.ones(16).half(), 1e-5) is None
    assert cpu_layers.rms_norm(x.t(), torch.ones(4), 1e-5) is None          # not contiguous
    assert not cpu_layers.rotary_(torch.randn(2, 3, 8).half(), torch.ones(2, 4).half(),
                                  torch.ones(2, 4).half())
    assert cpu_layers.argmax_logsumexp(torch.randn(3, 5).t()) is None      # rows not dense
    assert cpu_layers.argmax_logsumexp(torch.randn(3, 5).double()) is None
    assert cpu_layers.silu_mul(torch.randn(3, 5)) is None                  # odd width
    assert cpu_layers.silu_mul(torch.randn(6, 4).t()) is None              # columns apart


@needs_kernel
def test_c_decode_kernel_reads_queries_whose_rows_lie_apart():
    # the model hands it q as a view into the fused QKV output: rows 960 floats apart
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(4, 9 * 16 + 2 * 3 * 16, generator=g)
    q = qkv[:, :9 * 16].view(4, 9, 16)
    kc, vc = torch.randn(6, 4, 3, 16, generator=g), torch.randn(6, 4, 3, 16, generator=g)
    tables, lens = torch.tensor([[0, 1], [2, 3], [4, 0], [5, 1]]), torch.tensor([7, 8, 1, 5])
    apart = cpu_kernel.paged_attention_decode(q, kc, vc, tables, lens, 0.25)
    dense = cpu_kernel.paged_attention_decode(q.contiguous(), kc, vc, tables, lens, 0.25)
    assert not q.is_contiguous() and torch.equal(apart, dense)


@needs_layers
def test_c_argmax_logsumexp_matches_torch_first_maximum_and_logsumexp():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 1000, generator=g) * 10
    x[1, 7] = x[1, 500] = x[1].max() + 1          # a tie: the first index wins
    x[2, :] = -float("inf")                        # every token masked
    x[2, 3] = 0.5                                  # ... but one
    x[3, :] = -float("inf")
    x[4, 999] = float("inf")
    idx, lse = cpu_layers.argmax_logsumexp(x)
    assert torch.equal(idx, x.argmax(-1)) and idx[1] == 7
    # fp32 sums of 1000 terms in another order, |lse| ~ 40: measured worst 4e-6
    torch.testing.assert_close(lse, torch.logsumexp(x, -1), rtol=1e-6, atol=1e-5)
    assert lse[3] == -float("inf") and lse[4] == float("inf")


@needs_layers
@pytest.mark.parametrize("n", [1, 31, 32, 33, 100, 1000])
def test_c_argmax_takes_the_first_of_many_tied_maxima_wherever_they_lie(n):
    # values from {0..3}: every row has its maximum many times, in every lane and in
    # the tail past the last whole vector
    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 4, (40, n), generator=g).float()
    idx, _ = cpu_layers.argmax_logsumexp(x)
    assert torch.equal(idx, x.argmax(-1))


@needs_layers
def test_c_argmax_logsumexp_declines_rows_holding_a_nan():
    x = torch.randn(3, 40)
    x[1, 9] = float("nan")
    assert cpu_layers.argmax_logsumexp(x) is None


@needs_kernel
def test_c_cache_write_puts_each_row_in_its_slot_and_skips_minus_one():
    kc, vc = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    assert cpu_kernel.write_kv(key, value, kc, vc, torch.tensor([5, -1, 11]))
    flat_k, flat_v = kc.view(12, 2, 8), vc.view(12, 2, 8)
    assert torch.equal(flat_k[5], key[0]) and torch.equal(flat_v[11], value[2])
    assert int((flat_k.abs().sum((1, 2)) > 0).sum()) == 2          # token 1 went nowhere


@needs_kernel
def test_c_cache_write_rechecks_a_slot_mapping_changed_in_place():
    kc, vc = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    key, value = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    slots = torch.tensor([0, 1])
    assert cpu_kernel.write_kv(key, value, kc, vc, slots)    # checked, then remembered
    slots[1] = 12                                           # one past the last slot
    with pytest.raises(ValueError, match="slot outside the cache"):
        cpu_kernel.write_kv(key, value, kc, vc, slots)
    with pytest.raises(ValueError, match="one row per token"):
        cpu_kernel.write_kv(key, value, kc, vc, torch.tensor([0]))
