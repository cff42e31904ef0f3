"""Our LLaMA and OPT equal transformers' on small random models (DESIGN.md section 6).

Each model is built by transformers from a tiny LlamaConfig / OPTConfig, its weights are
re-drawn at a scale where every part matters (biases, norms and positions far from their
identity initialisation), saved with save_pretrained, and loaded back through our HF
directory loader. The same prompts then run through transformers' forward, through our
model over a paged cache with shuffled blocks (a ragged prefill, then decode steps), and
through the pure-NumPy forward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minipaged.model_executor.weight_loader import load_model
from minipaged.models.numpy_forward import numpy_forward

pytest.register_assert_rewrite("tests.fixtures_models")
from tests.fixtures_models import PagedHarness

# the shared session-scoped models (until tests/conftest.py registers the module)
pytest_plugins = ["tests.fixtures_models"]

# fp32 everywhere; logits of these models are O(1-10). Different summation orders (fused
# GEMMs, SDPA's blocked softmax vs transformers' eager/SDPA path) differ by ~1e-6 relative.
ATOL = 2e-4

VOCAB = 97
PROMPT_LENS = [7, 1, 13, 4]     # ragged, one single-token prompt, > several blocks of 4


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))     # norm scales
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))           # biases
            else:
                std = 1.0 if "embed" in name else 1.5 / p.shape[1] ** 0.5
                p.copy_(std * torch.randn(p.shape, generator=g))


LLAMA_CASES = {
    "llama-gqa-tied": {"num_key_value_heads": 2, "tie_word_embeddings": True},
    "llama-mha-untied": {"num_key_value_heads": 4, "tie_word_embeddings": False},
    "llama-mqa-bias-theta": {"num_key_value_heads": 1, "attention_bias": True,
                             "rope_theta": 500.0},
    "llama3-rope-scaling": {"num_key_value_heads": 2, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
}
OPT_CASES = {
    "opt-pre-ln": {"do_layer_norm_before": True},
    "opt-post-ln": {"do_layer_norm_before": False},              # OPT-350m's layout
    "opt-project-in-out": {"do_layer_norm_before": True, "word_embed_proj_dim": 32},
    "opt-untied": {"do_layer_norm_before": True, "tie_word_embeddings": False},
}


def _build(case: str):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
    if case in LLAMA_CASES:
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                          max_position_embeddings=64, rms_norm_eps=1e-5,
                          **LLAMA_CASES[case])
        model = LlamaForCausalLM(cfg)
    else:
        cfg = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64,
                        **{"word_embed_proj_dim": 64, **OPT_CASES[case]})
        model = OPTForCausalLM(cfg)
    _randomize(model, seed=sum(map(ord, case)))
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module", params=[*LLAMA_CASES, *OPT_CASES])
def random_model(request, tmp_path_factory):
    """(transformers model, our LoadedModel) for one configuration, via save_pretrained."""
    hf = _build(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, load_model(str(path), dtype="float32")


def _prompts(seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in PROMPT_LENS]


@torch.inference_mode()
def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("backend_name", ["torch", "numpy"])
def test_paged_prefill_then_decode_logits_equal_transformers(random_model, backend_name,
                                                              request):
    hf, ours = random_model
    backend = request.getfixturevalue(f"{backend_name}_backend")
    harness = PagedHarness(ours.config, num_blocks=48, block_size=4, seed=3)
    prompts = _prompts(0)
    seqs = [harness.add_sequence() for _ in prompts]
    got = harness.step(ours.model, backend, seqs, prompts)
    for ids, logits in zip(prompts, got):
        torch.testing.assert_close(logits, _hf_logits(hf, ids), atol=ATOL, rtol=0)
    # three decode steps of the whole batch, the tokens drawn at random
    rng = np.random.default_rng(1)
    for _ in range(3):
        new = [[int(rng.integers(VOCAB))] for _ in seqs]
        got = harness.step(ours.model, backend, seqs, new)
        for i, (tok, logits) in enumerate(zip(new, got)):
            prompts[i] = prompts[i] + tok
            torch.testing.assert_close(logits[0], _hf_logits(hf, prompts[i])[-1],
                                       atol=ATOL, rtol=0)


def test_chunked_prefill_equals_one_shot_prefill(random_model, torch_backend):
    """A prompt fed in three chunks attends to its cached prefix like a single prefill."""
    hf, ours = random_model
    ids = _prompts(5)[2]                                           # 13 tokens
    harness = PagedHarness(ours.config, num_blocks=16, block_size=4, seed=4)
    s = harness.add_sequence()
    chunks = [ids[:5], ids[5:6], ids[6:]]
    got = torch.cat([harness.step(ours.model, torch_backend, [s], [c])[0] for c in chunks])
    torch.testing.assert_close(got, _hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_numpy_forward_equals_transformers(random_model):
    hf, ours = random_model
    weights = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    ids = _prompts(7)[0]
    got = numpy_forward(ours.config, weights, ids)
    # float64 against transformers' fp32: the same ~1e-6 relative differences
    np.testing.assert_allclose(got, _hf_logits(hf, ids).numpy(), atol=ATOL, rtol=0)


def test_logits_are_not_trivially_small(random_model):
    """Guards the tolerance above: these models' logits spread over several units."""
    hf, _ = random_model
    logits = _hf_logits(hf, _prompts(0)[0])
    assert logits.std() > 0.5


@torch.inference_mode()
def test_output_rows_return_those_rows_and_still_cache_every_row(random_model, torch_backend):
    """`output_rows`: the last layer computes only the rows the caller reads (each
    sequence's last token, and here one middle token too), yet writes every row's K/V."""
    _, ours = random_model
    prompts = _prompts(2)
    ids = torch.tensor([t for p in prompts for t in p])
    rows = torch.tensor([6, 7, 12, 20, 24])      # the four last rows and position 4 of #2
    results = []
    for output_rows in (None, rows):
        harness = PagedHarness(ours.config, num_blocks=48, block_size=4, seed=3)
        seqs = [harness.add_sequence() for _ in prompts]
        positions, meta = harness.metadata(seqs, prompts)
        hidden = ours.model(ids, positions, harness.caches, meta, torch_backend,
                            output_rows=output_rows)
        results.append((hidden, harness.caches))
    (full, full_caches), (part, part_caches) = results
    assert part.shape == (len(rows), full.shape[1])
    # the decode kernel (one query) and the prefill kernel sum in different orders
    torch.testing.assert_close(part, full[rows], atol=ATOL, rtol=0)
    for a, b in zip(full_caches, part_caches):   # K/V: the same ops on the same rows
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)


@torch.inference_mode()
def test_no_output_rows_still_caches_every_row(random_model, torch_backend):
    """A step that samples nothing (a non-final prompt chunk) returns no rows, and the
    next chunk attends to everything it cached."""
    hf, ours = random_model
    ids = _prompts(5)[2]                                           # 13 tokens
    harness = PagedHarness(ours.config, num_blocks=16, block_size=4, seed=4)
    s = harness.add_sequence()
    positions, meta = harness.metadata([s], [ids[:9]])
    hidden = ours.model(torch.tensor(ids[:9]), positions, harness.caches, meta,
                        torch_backend, output_rows=torch.zeros(0, dtype=torch.int64))
    assert hidden.shape[0] == 0
    got = harness.step(ours.model, torch_backend, [s], [ids[9:]])[0]
    torch.testing.assert_close(got, _hf_logits(hf, ids)[9:], atol=ATOL, rtol=0)
