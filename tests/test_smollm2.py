"""The real default model: our SmolLM2-135M equals transformers' on the same GGUF weights.

Both sides read the same file: ours through our GGUF conversion (dequantize, rename,
un-permute Q/K) and our paged LLaMA, transformers through its own GGUF integration and
its own LlamaForCausalLM. Agreement checks the conversion, the model and the paged
attention together, on real weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minipaged.models.numpy_forward import numpy_forward

pytest.register_assert_rewrite("tests.fixtures_models")
from tests.fixtures_models import PagedHarness, paged_greedy

# the shared session-scoped models (until tests/conftest.py registers the module)
pytest_plugins = ["tests.fixtures_models"]

pytestmark = pytest.mark.slow

# fp32 on both sides; SmolLM2's logits reach ~30. Over 30 layers the differing summation
# orders (fused QKV / gate-up GEMMs, paged SDPA vs transformers' attention) accumulate to
# ~2e-5 observed; 1e-3 absolute leaves room for other BLAS builds and still catches any
# real error (a wrong permutation or position moves logits by units).
ATOL = 1e-3

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a land far away, there lived a dragon who loved",
    "1, 2, 3, 5, 8, 13,",
]
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
]


@torch.inference_mode()
def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()


def test_ragged_paged_prefill_and_decode_equal_transformers(smollm2, hf_smollm2, torch_backend):
    tok = smollm2.tokenizer
    prompts = [tok(p).input_ids for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 1                       # ragged
    harness = PagedHarness(smollm2.config, num_blocks=64, block_size=4, seed=11)
    seqs = [harness.add_sequence() for _ in prompts]
    steps = [harness.step(smollm2.model, torch_backend, seqs, prompts)]
    for _ in range(3):                                              # greedy decode steps
        new = [[int(lg[-1].argmax())] for lg in steps[-1]]
        prompts = [p + t for p, t in zip(prompts, new)]
        steps.append(harness.step(smollm2.model, torch_backend, seqs, new))
    # transformers sees each whole sequence at once: its row t must equal our logits for
    # token t, whether we computed that token in the prefill or in a decode step
    for i, ids in enumerate(prompts):
        ours = torch.cat([step[i] for step in steps])
        torch.testing.assert_close(ours, _hf_logits(hf_smollm2, ids), atol=ATOL, rtol=0)


def test_numpy_forward_agrees_with_both(smollm2, hf_smollm2, torch_backend):
    from safetensors.numpy import load_file
    weights = load_file(str(smollm2.path / "model.safetensors"))
    ids = smollm2.tokenizer("Paged attention splits the cache").input_ids
    reference = numpy_forward(smollm2.config, weights, ids)
    np.testing.assert_allclose(_hf_logits(hf_smollm2, ids).numpy(), reference, atol=ATOL, rtol=0)
    harness = PagedHarness(smollm2.config, num_blocks=8, block_size=4, seed=2)
    ours = harness.step(smollm2.model, torch_backend, [harness.add_sequence()], [ids])[0]
    np.testing.assert_allclose(ours.numpy(), reference, atol=ATOL, rtol=0)


def test_paged_numpy_backend_equals_transformers_on_a_short_prompt(smollm2, hf_smollm2,
                                                                  numpy_backend):
    """The reference backend, on real weights (slow in Python: keep the prompt short)."""
    ids = smollm2.tokenizer("Hello, my name is").input_ids
    harness = PagedHarness(smollm2.config, num_blocks=8, block_size=2, seed=5)
    got = harness.step(smollm2.model, numpy_backend, [harness.add_sequence()], [ids])[0]
    torch.testing.assert_close(got, _hf_logits(hf_smollm2, ids), atol=ATOL, rtol=0)


def _chat_ids(tok, content: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": content}],
                                   add_generation_prompt=True, tokenize=False)
    return tok(text).input_ids


def test_greedy_chat_through_paged_cache_reproduces_transformers_generate(smollm2, hf_smollm2,
                                                                         torch_backend):
    tok = smollm2.tokenizer
    ids = _chat_ids(tok, CHATS[0])
    ours = paged_greedy(smollm2.model, torch_backend, smollm2.config, [ids], 16,
                        eos_ids=smollm2.config.eos_token_ids)[0]
    with torch.inference_mode():
        out = hf_smollm2.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                  max_new_tokens=16, do_sample=False)
    assert ours == out[0, len(ids):].tolist()
    assert "Paris" in tok.decode(ours)
    assert ours[-1] in smollm2.config.eos_token_ids              # it stopped by itself


def test_batched_greedy_chats_are_transformers_greedy_choices(smollm2, hf_smollm2, torch_backend):
    """Several chats decoded together; at every step our token is transformers' argmax.

    Checked by teacher forcing: one transformers forward over prompt + our continuation
    gives, at each position, the token its greedy decoding would pick there.
    """
    tok = smollm2.tokenizer
    prompts = [_chat_ids(tok, c) for c in CHATS]
    outputs = paged_greedy(smollm2.model, torch_backend, smollm2.config, prompts, 12,
                           eos_ids=smollm2.config.eos_token_ids)
    for ids, ours in zip(prompts, outputs):
        logits = _hf_logits(hf_smollm2, ids + ours)
        theirs = logits[len(ids) - 1:-1].argmax(-1).tolist()
        assert ours == theirs
