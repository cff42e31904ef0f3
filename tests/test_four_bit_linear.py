"""The exact 4-bit weight path (kernels/cpu_4bit_linear.c): a float32 matrix that came
from a Q4_1 file is packed as codes and scales that rebuild it bit for bit, any other
matrix is refused, and the product over the packed form is the float32 product; linear
layers use it for decode-sized products and never with a stale copy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

from minipaged.kernels import cpu_4bit
from minipaged.kernels.cpu_build import load
from minipaged.kernels.reference import unpack_4bit
from minipaged.models import packed_linear as packed_linear_module
from minipaged.models.layers import Linear
from tests.strategies import q4_1_matrices

pytest_plugins = ["tests.fixtures_models"]

pytestmark = pytest.mark.skipif(load("cpu_4bit_linear") is None,
                                reason="no C compiler: the 4-bit kernel cannot be built")
needs_fast_kernel = pytest.mark.skipif(
    not cpu_4bit.available(), reason="layers use the 4-bit form only where AVX-512 is")


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _fixed_q4_1(n: int, k: int, seed: int) -> np.ndarray:
    import gguf
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    kind = gguf.GGMLQuantizationType.Q4_1
    return gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind).reshape(n, k)


@given(w=q4_1_matrices())
def test_a_q4_1_matrix_is_packed_and_rebuilt_bit_for_bit(w):
    packed = cpu_4bit.pack_exact_4bit(torch.from_numpy(w))
    assert packed is not None
    np.testing.assert_array_equal(_bits(unpack_4bit(packed.numpy(), *w.shape)), _bits(w))


@given(w=q4_1_matrices(max_panels=1, max_blocks=2))
def test_one_value_off_by_one_ulp_leaves_the_matrix_unpacked(w):
    w = w.copy()
    w[w.shape[0] // 2, w.shape[1] // 3] = np.nextafter(w[w.shape[0] // 2, w.shape[1] // 3],
                                                       np.float32(np.inf))
    assert cpu_4bit.pack_exact_4bit(torch.from_numpy(w)) is None


def test_a_random_float32_matrix_has_no_4bit_form():
    assert cpu_4bit.pack_exact_4bit(torch.randn(64, 64)) is None


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_matrix_holding_nan_or_infinity_has_no_4bit_form(bad):
    w = _fixed_q4_1(32, 32, 1)
    w[3, 5] = bad
    assert cpu_4bit.pack_exact_4bit(torch.from_numpy(w)) is None


@pytest.mark.parametrize("shape", [(48, 64), (64, 48), (32, 0)])
def test_shapes_that_are_not_whole_32_by_32_tiles_are_declined(shape):
    assert cpu_4bit.pack_exact_4bit(torch.zeros(shape)) is None


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("rows", [1, 2, 11, 12, 13, 25, 64, 257])
def test_the_4bit_product_equals_the_float32_product(rows, bias):
    w = torch.from_numpy(_fixed_q4_1(96, 160, rows))
    b = torch.randn(96) if bias else None
    x = torch.randn(rows, 160)
    y = cpu_4bit.linear_4bit(x, cpu_4bit.pack_exact_4bit(w), 96, b)
    expected = x.double() @ w.double().T + (0 if b is None else b.double())
    # |y| ~ 1, K = 160: fp32 summation in another order, measured worst ~1e-6
    np.testing.assert_allclose(y.numpy(), expected.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [64, 96, 128])    # panels one by one, in pairs, both
@pytest.mark.parametrize("k", [64, 224])              # one chunk of inputs; a chunk and a part
def test_the_kernel_rebuilds_every_weight_bit_for_bit(k, n, threads):
    # x = I: each output is 1.0 x one weight plus exact zeros, so y = W^T exactly; a
    # weight rebuilt even one ulp off (a wrong code, scale or rounding) would show
    w = torch.from_numpy(_fixed_q4_1(n, k, k))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)          # each thread takes a run of panels
    try:
        y = cpu_4bit.linear_4bit(torch.eye(k), cpu_4bit.pack_exact_4bit(w), n)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y, w.T)


def test_the_4bit_product_reads_rows_of_a_wider_tensor():
    w = torch.from_numpy(_fixed_q4_1(64, 64, 3))
    wide = torch.randn(5, 128)
    x = wide[:, :64]                          # like the gate half of the fused gate_up output
    y = cpu_4bit.linear_4bit(x, cpu_4bit.pack_exact_4bit(w), 64)
    np.testing.assert_allclose(y.numpy(), (x.double() @ w.double().T).numpy(), rtol=0, atol=1e-5)


def test_the_4bit_product_declines_what_it_was_not_written_for():
    w = torch.from_numpy(_fixed_q4_1(32, 32, 4))
    packed = cpu_4bit.pack_exact_4bit(w)
    assert cpu_4bit.linear_4bit(torch.randn(2, 32, dtype=torch.float64), packed, 32) is None
    assert cpu_4bit.linear_4bit(torch.randn(2, 64), packed, 32) is None      # wrong K
    assert cpu_4bit.linear_4bit(torch.randn(2, 32), packed, 32, torch.zeros(16)) is None


def test_the_default_models_weights_have_an_exact_4bit_form(smollm2_gguf):
    import gguf
    reader = gguf.GGUFReader(smollm2_gguf)
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    w = np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type))
    w = w.reshape(int(tensor.shape[1]), int(tensor.shape[0]))
    packed = cpu_4bit.pack_exact_4bit(torch.from_numpy(w))
    assert packed is not None
    np.testing.assert_array_equal(_bits(unpack_4bit(packed.numpy(), *w.shape)), _bits(w))
    assert packed.numel() * 5.3 < w.nbytes                 # what the kernel saves in reads


def _layer_with(weight: torch.Tensor) -> Linear:
    layer = Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float32)
    layer.load_shard(0, "weight", weight)
    return layer


@needs_fast_kernel
def test_a_layer_reads_exact_4bit_weights_in_that_form_up_to_256_rows(monkeypatch):
    monkeypatch.delenv(packed_linear_module.FOUR_BIT_SWITCH, raising=False)
    layer = _layer_with(torch.from_numpy(_fixed_q4_1(64, 96, 5)))
    seen = []
    real = cpu_4bit.linear_4bit
    monkeypatch.setattr(cpu_4bit, "linear_4bit", lambda *a, **k: seen.append(1) or real(*a, **k))
    for rows, used in [(64, True), (256, True), (257, False)]:
        seen.clear()
        x = torch.randn(rows, 96)
        with torch.inference_mode():
            # fp32, |y| ~ 1: another summation order
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
        assert bool(seen) == used, rows


@needs_fast_kernel
def test_the_switch_turns_the_4bit_form_off(monkeypatch):
    monkeypatch.setenv(packed_linear_module.FOUR_BIT_SWITCH, "0")
    layer = _layer_with(torch.from_numpy(_fixed_q4_1(32, 32, 6)))
    with torch.inference_mode():
        layer(torch.randn(4, 32))
    assert "_packed_4bit" not in layer.__dict__


@needs_fast_kernel
def test_a_changed_4bit_weight_is_repacked_before_its_next_use(monkeypatch):
    monkeypatch.delenv(packed_linear_module.FOUR_BIT_SWITCH, raising=False)
    layer = _layer_with(torch.from_numpy(_fixed_q4_1(32, 64, 7)))
    x = torch.randn(3, 64)
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)                # still exactly 4-bit: d and m doubled
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), x @ layer.weight.T, rtol=1e-5, atol=1e-5)
    assert layer.__dict__["_packed_4bit"][2] is not None
    layer.load_shard(0, "weight", torch.full((32, 64), 0.5))   # through .data, like the loader
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), x @ torch.full((64, 32), 0.5), rtol=1e-5, atol=1e-5)
