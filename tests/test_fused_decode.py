"""The fused decode step (minipaged/models/fused_decode.py, kernels/cpu_decode_step.c):
a LLaMA decode batch run as one C call gives the Python forward's hidden states and
cache contents bit for bit, and it runs only where the Python forward would have run the
same kernels; everywhere else the Python forward runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minipaged.attention.torch_backend import TorchBackend
from minipaged.kernels import cpu_4bit
from minipaged.kernels.cpu_build import load
from minipaged.models.config import ModelConfig
from minipaged.models.fused_decode import SWITCH
from minipaged.models.llama import LlamaForCausalLM
from tests.fixtures_models import PagedHarness

pytest_plugins = ["tests.fixtures_models"]

pytestmark = pytest.mark.skipif(
    load("cpu_decode_step") is None or not cpu_4bit.available(),
    reason="the fused step needs the C kernels and the AVX-512 4-bit kernel")

PROMPTS = [[3, 17, 4, 9, 22], [5], [8, 1, 30, 2, 2, 7, 11, 40, 6], [12, 12, 3]]


def _q4_1(shape: tuple[int, int], rng: np.random.Generator, scale: float) -> torch.Tensor:
    """A random matrix in its float32 Q4_1 form (what a Q4_1 GGUF loads as)."""
    import gguf
    w = (rng.standard_normal(shape) * scale).astype(np.float32)
    kind = gguf.GGMLQuantizationType.Q4_1
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind)
                            .reshape(shape).copy())


def _model(seed: int = 0, bias: bool = False, q4_1: bool = True) -> LlamaForCausalLM:
    """A 2-layer LLaMA with grouped-query attention, every dimension a multiple of 32."""
    config = ModelConfig(architecture="llama", vocab_size=48, hidden_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=96,
                         max_position_embeddings=64, tie_word_embeddings=True,
                         attention_bias=bias, mlp_bias=bias)
    rng = np.random.default_rng(seed)
    # normal tensors even where the caller runs in inference mode: packed copies are
    # keyed on the weights' version counters, which inference tensors lack
    with torch.inference_mode(False), torch.no_grad():
        model = LlamaForCausalLM(config)
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                scale = 1.5 / p.shape[1] ** 0.5
                p.copy_(_q4_1(tuple(p.shape), rng, scale) if q4_1 else
                        torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32)
                                         * scale))
            elif p.dim() == 2:
                p.copy_(torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32)))
            elif "norm" in name:
                p.copy_(torch.from_numpy(1 + 0.2 * rng.standard_normal(p.shape)
                                         .astype(np.float32)))
            else:
                p.copy_(torch.from_numpy(0.1 * rng.standard_normal(p.shape).astype(np.float32)))
    return model.eval()


def _prefilled(model, backend) -> tuple[PagedHarness, list[int]]:
    harness = PagedHarness(model.config, num_blocks=32, block_size=4, seed=3)
    seqs = [harness.add_sequence() for _ in PROMPTS]
    harness.step(model, backend, seqs, PROMPTS)
    return harness, seqs


@torch.inference_mode()
def _decode(model, backend, monkeypatch, fused: bool, steps: int = 3):
    """Hidden states of `steps` decode steps after the prompts, and the caches after."""
    monkeypatch.setenv(SWITCH, "1" if fused else "0")
    harness, seqs = _prefilled(model, backend)
    hidden = []
    for i in range(steps):
        positions, meta = harness.metadata(seqs, [[(7 * s + i) % 48] for s in seqs])
        ids = torch.tensor([(7 * s + i) % 48 for s in seqs])
        hidden.append(model(ids, positions, harness.caches, meta, backend))
    return hidden, harness.caches


def _equal_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # NaN marks cache slots never written: equal there too, bit for bit
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "biases"])
def test_a_fused_decode_step_gives_the_python_forwards_hidden_states_bit_for_bit(
        bias, monkeypatch):
    model, backend = _model(bias=bias), TorchBackend()
    fused, fused_caches = _decode(model, backend, monkeypatch, fused=True)
    assert model.fused_decode.steps_run == 3               # every decode step was fused
    plain, plain_caches = _decode(model, backend, monkeypatch, fused=False)
    assert model.fused_decode.steps_run == 3
    for a, b in zip(fused, plain):
        assert _equal_bits(a, b)
    for (fk, fv), (pk, pv) in zip(fused_caches, plain_caches):
        assert _equal_bits(fk, pk) and _equal_bits(fv, pv)


@torch.inference_mode()
def test_the_fused_step_declines_a_batch_that_holds_a_prompt(monkeypatch):
    model, backend = _model(), TorchBackend()
    harness = PagedHarness(model.config, num_blocks=32, block_size=4, seed=3)
    seqs = [harness.add_sequence() for _ in PROMPTS]
    positions, meta = harness.metadata(seqs, PROMPTS)
    ids = torch.tensor([t for p in PROMPTS for t in p])
    assert model.fused_decode.run(ids, positions, harness.caches, meta, backend) is None
    assert all(torch.isnan(k).all() for k, _ in harness.caches)     # nothing written


@torch.inference_mode()
def test_the_fused_step_declines_weights_without_an_exact_4bit_form(monkeypatch):
    model, backend = _model(q4_1=False), TorchBackend()
    harness, seqs = _prefilled(model, backend)
    positions, meta = harness.metadata(seqs, [[1] for _ in seqs])
    ids = torch.ones(len(seqs), dtype=torch.int64)
    assert model.fused_decode.run(ids, positions, harness.caches, meta, backend) is None


@torch.inference_mode()
@pytest.mark.parametrize("how", ["switch", "backend"])
def test_the_switch_or_a_backend_without_the_c_kernel_leaves_the_python_forward(
        how, monkeypatch):
    model = _model()
    backend = TorchBackend(c_kernel=False) if how == "backend" else TorchBackend()
    if how == "switch":
        monkeypatch.setenv(SWITCH, "0")
    harness, seqs = _prefilled(model, backend)
    positions, meta = harness.metadata(seqs, [[1] for _ in seqs])
    ids = torch.ones(len(seqs), dtype=torch.int64)
    assert model.fused_decode.run(ids, positions, harness.caches, meta, backend) is None


@torch.inference_mode()
def test_a_slot_outside_the_cache_is_refused_before_anything_is_written():
    model, backend = _model(), TorchBackend()
    harness, seqs = _prefilled(model, backend)
    positions, meta = harness.metadata(seqs, [[1] for _ in seqs])
    meta.slot_mapping[0] = 32 * 4                        # one past the last slot
    before = [k.clone() for k, _ in harness.caches]
    ids = torch.ones(len(seqs), dtype=torch.int64)
    with pytest.raises(ValueError, match="slot_mapping"):
        model.fused_decode.run(ids, positions, harness.caches, meta, backend)
    assert all(_equal_bits(a, k) for a, (k, _) in zip(before, harness.caches))


@torch.inference_mode()
def test_a_weight_loaded_between_steps_is_what_the_next_fused_step_reads(monkeypatch):
    model, backend = _model(), TorchBackend()
    _decode(model, backend, monkeypatch, fused=True, steps=1)       # builds the array
    rng = np.random.default_rng(9)
    down = model.layers[1].mlp.down_proj
    down.load_shard(0, "weight", _q4_1(tuple(down.weight.shape), rng, 0.2))
    fused, _ = _decode(model, backend, monkeypatch, fused=True, steps=1)
    plain, _ = _decode(model, backend, monkeypatch, fused=False, steps=1)
    assert _equal_bits(fused[0], plain[0])


@torch.inference_mode()
def _step(model, backend, monkeypatch, harness, seqs, fused: bool, i: int) -> torch.Tensor:
    monkeypatch.setenv(SWITCH, "1" if fused else "0")
    positions, meta = harness.metadata(seqs, [[(7 * s + i) % 48] for s in seqs])
    ids = torch.tensor([(7 * s + i) % 48 for s in seqs])
    return model(ids, positions, harness.caches, meta, backend)


def test_a_weight_changed_in_place_between_steps_is_what_the_next_fused_step_reads(
        monkeypatch):
    """The layer array is reused while nothing it was built from changed. An in-place
    write bumps the weight's version: the next step repacks it and rebuilds the array."""
    model, backend = _model(), TorchBackend()
    fused_run, plain_run = _prefilled(model, backend), _prefilled(model, backend)
    for run, fused in ((fused_run, True), (plain_run, False)):
        _step(model, backend, monkeypatch, *run, fused=fused, i=0)
    steps = model.fused_decode.steps_run
    gate_up = model.layers[0].mlp.gate_up_proj
    with torch.no_grad():
        gate_up.weight.copy_(_q4_1(tuple(gate_up.weight.shape), np.random.default_rng(5),
                                   0.2))
    fused = _step(model, backend, monkeypatch, *fused_run, fused=True, i=1)
    plain = _step(model, backend, monkeypatch, *plain_run, fused=False, i=1)
    assert model.fused_decode.steps_run == steps + 1
    assert _equal_bits(fused, plain)


def test_turning_the_4bit_reads_off_between_steps_leaves_the_python_forward(monkeypatch):
    model, backend = _model(), TorchBackend()
    harness, seqs = _prefilled(model, backend)
    _step(model, backend, monkeypatch, harness, seqs, fused=True, i=0)
    before = model.fused_decode.steps_run
    monkeypatch.setenv("MINIPAGED_4BIT_WEIGHTS", "0")
    _step(model, backend, monkeypatch, harness, seqs, fused=True, i=1)
    assert model.fused_decode.steps_run == before


@torch.inference_mode()
def test_smollm2_decode_steps_are_bit_identical_fused_and_in_python(smollm2, torch_backend,
                                                                    monkeypatch):
    """The default model: its weights have exact 4-bit forms, so its decode is fused."""
    ids = smollm2.tokenizer("Paged attention splits the cache").input_ids
    results, before = {}, smollm2.model.fused_decode.steps_run
    for fused in (True, False):
        monkeypatch.setenv(SWITCH, "1" if fused else "0")
        harness = PagedHarness(smollm2.config, num_blocks=16, block_size=4, seed=2)
        seqs = [harness.add_sequence(), harness.add_sequence()]
        harness.step(smollm2.model, torch_backend, seqs, [ids, ids[:3]])
        results[fused] = [harness.step(smollm2.model, torch_backend, seqs, [[t], [t + 1]])
                          for t in (42, 7)]
    assert smollm2.model.fused_decode.steps_run == before + 2
    for a, b in zip(results[True], results[False]):
        assert all(_equal_bits(x, y) for x, y in zip(a, b))

