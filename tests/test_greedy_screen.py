"""The greedy screen (minipaged/models/greedy_head.py, greedy_screen_f32 in
kernels/cpu_layers.c) and the path that uses it: a greedy row that reports no logprobs
gets its token from the model runner (BatchItem.argmax_only), never forming its full
float32 logits.

The spec: the screen's token is the float32 argmax. Checked against float64 logits,
up to the float32 summation error of the two products compared (stated where used).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from minipaged import LLM, SamplingParams
from minipaged.kernels import cpu_layers
from minipaged.logits_processing import argmax_suffices
from minipaged.models import greedy_head
from minipaged.sequence import Sequence
from tests.fixtures_models import save_tiny_llama
from tests.strategies import screen_cases

needs_c = pytest.mark.skipif(cpu_layers._layers() is None, reason="no C compiler here")


@pytest.fixture(autouse=True)
def screen_on(monkeypatch):
    """Force the screen on whatever this machine's bf16 speed (it is timed otherwise)."""
    monkeypatch.setenv(greedy_head.SWITCH, "1")


class Head(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


def float32_tolerance(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per row: twice the float32 summation bound (k + 2) 2^-24 |h| max|w| (two float32
    products of the same row may differ by that much)."""
    k = hidden.shape[1]
    return 2 * (k + 2) * 2.0**-24 * hidden.norm(dim=1) * weight.norm(dim=1).max()


def assert_float32_argmax(tokens: torch.Tensor, hidden: torch.Tensor,
                          weight: torch.Tensor) -> None:
    exact = hidden.double() @ weight.double().T
    got = exact.gather(1, tokens[:, None]).squeeze(1)
    assert bool((got >= exact.max(dim=1).values - float32_tolerance(hidden, weight)).all())


@needs_c
@given(screen_cases())
def test_the_screen_returns_the_float32_argmax(case):
    tokens = greedy_head.greedy_tokens(Head(case.weight), case.hidden, case.weight)
    assert tokens is not None and tokens.shape == (case.hidden.shape[0],)
    assert_float32_argmax(tokens, case.hidden, case.weight)


def rows_bf16_misorders(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A hidden state and an LM head whose bf16 logits rank the tokens wrongly: tokens
    1..7 are token 0's row scaled by 1 + j 2^-12 (bf16 rounds most of them back to it)."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(64, generator=g)
    weight = torch.stack([w0 * (1 + j * 2.0**-12) for j in range(8)]
                         + [torch.randn(64, generator=g) * 0.01 for _ in range(40)])
    hidden = w0[None, :].clone()                 # logit j = |w0|^2 (1 + j 2^-12)
    return hidden, weight


@needs_c
def test_the_screen_finds_the_winner_that_bf16_logits_cannot_see():
    hidden, weight = rows_bf16_misorders()
    bf16 = (hidden.bfloat16() @ weight.bfloat16().T).float()
    assert int(bf16.argmax()) != 7               # bf16 alone picks a wrong token
    assert greedy_head.greedy_tokens(Head(weight), hidden, weight).tolist() == [7]


# Found by search (against kernels built with one term of the bound dropped): each
# case loses its float32 argmax to a bf16 argmax without that term.
BOUND_CASES = {
    "the rounding of the bf16 result": (
        [10.3125, -3.625], [[14.1875, -11.125], [-0.5, -10.625], [18.0625, -0.203125]], 2),
    "the rounding of the hidden state": (
        [-293.5, 35.125], [[-9.1875, -95.0], [38.0, -256.0], [4.5625, 20.0]], 2),
    "the rounding of the weights": (
        [5.875, 274.0], [[32.875, -1.0], [2.828125, -0.35546875], [10.25, -18.5]], 1),
}


@needs_c
@pytest.mark.parametrize("term", BOUND_CASES)
def test_the_bound_covers(term):
    h, w, best = BOUND_CASES[term]
    hidden, weight = torch.tensor([h]), torch.tensor(w)
    bf16 = hidden.bfloat16() @ weight.bfloat16().T
    assert int(bf16.float().argmax()) != best                 # bf16 alone is wrong
    assert int((hidden.double() @ weight.double().T).argmax()) == best
    assert greedy_head.greedy_tokens(Head(weight), hidden, weight).tolist() == [best]


@needs_c
def test_the_screen_rescores_only_tokens_it_cannot_rule_out():
    hidden, weight = rows_bf16_misorders()
    hb = hidden.bfloat16()
    lb = hb @ weight.bfloat16().T
    w64 = weight.double()
    wn = (w64.norm(dim=1) * (1 + 2**-20)).float()
    dwn = ((w64 - weight.bfloat16().double()).norm(dim=1) * (1 + 2**-20)).float()
    tokens, candidates = cpu_layers.greedy_screen(lb, hb, hidden, weight, wn, dwn)
    # the 8 near-equal tokens are rescored; the 40 small random rows are ruled out
    assert tokens.tolist() == [7] and candidates.tolist() == [8]


@needs_c
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_row_that_is_not_finite_is_left_to_the_float32_path(bad):
    hidden, weight = rows_bf16_misorders()
    hidden[0, 3] = bad
    assert greedy_head.greedy_tokens(Head(weight), hidden, weight) is None


@needs_c
def test_the_bf16_copy_follows_an_edited_weight():
    hidden, weight = rows_bf16_misorders()
    head = Head(weight)
    assert greedy_head.greedy_tokens(head, hidden, head.weight).tolist() == [7]
    with torch.no_grad():
        head.weight[2] *= 2                          # in place: the version changes
    assert greedy_head.greedy_tokens(head, hidden, head.weight).tolist() == [2]


def test_the_switch_turns_the_screen_off(monkeypatch):
    hidden, weight = rows_bf16_misorders()
    monkeypatch.setenv(greedy_head.SWITCH, "0")
    assert greedy_head.greedy_tokens(Head(weight), hidden, weight) is None


def test_unset_the_screen_runs_only_where_bf16_was_measured_faster(monkeypatch):
    hidden, weight = rows_bf16_misorders()
    monkeypatch.delenv(greedy_head.SWITCH)
    monkeypatch.setattr(greedy_head, "_decided", {})
    monkeypatch.setattr(greedy_head, "_measured_pays", lambda: False)   # a CPU without bf16
    assert greedy_head.greedy_tokens(Head(weight), hidden, weight) is None
    monkeypatch.setattr(greedy_head, "_measured_pays", lambda: True)    # decided once
    assert greedy_head.greedy_tokens(Head(weight), hidden, weight) is None


def test_a_bad_switch_value_is_a_value_error_naming_it(monkeypatch):
    hidden, weight = rows_bf16_misorders()
    monkeypatch.setenv(greedy_head.SWITCH, "sometimes")
    with pytest.raises(ValueError, match=greedy_head.SWITCH):
        greedy_head.greedy_tokens(Head(weight), hidden, weight)


@pytest.mark.parametrize("params, outputs, suffices", [
    (SamplingParams(temperature=0), 0, True),
    (SamplingParams(temperature=0, logprobs=0), 0, False),       # its logprob is reported
    (SamplingParams(temperature=0.8), 0, False),                  # a draw needs all logits
    (SamplingParams(temperature=0, repetition_penalty=1.2), 0, False),
    (SamplingParams(temperature=0, min_tokens=2), 1, False),      # EOS still masked
    (SamplingParams(temperature=0, min_tokens=2), 2, True),
    (SamplingParams(n=2, use_beam_search=True, temperature=0), 0, False),
])
def test_argmax_suffices_only_for_a_plain_greedy_row(params, outputs, suffices):
    assert argmax_suffices(params, outputs) is suffices


def test_a_token_without_its_logprob_leaves_no_cumulative_logprob():
    seq = Sequence(0, [1, 2])
    seq.append_token(5, {5: -0.5})
    seq.append_token(6, None)
    seq.append_token(7, {7: -0.25})
    assert seq.output_token_ids == [5, 6, 7] and seq.cumulative_logprob is None


def test_a_sequence_reporting_logprobs_refuses_a_token_without_one():
    seq = Sequence(0, [1, 2], return_logprobs=True)
    with pytest.raises(ValueError, match="logprobs"):
        seq.append_token(5, None)


# -- through the engine, on a tiny random LLaMA ------------------------------------------

@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_screen")
    save_tiny_llama(path, vocab_size=200, tie_word_embeddings=True)   # the head is tied
    return path


PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3] * 40, [150, 2]]


def generate(path, params: SamplingParams, **engine) -> list:
    llm = LLM(model=str(path), max_model_len=128, seed=0, num_gpu_blocks=64,
              enable_prefix_caching=False, **engine)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert llm.stats()["num_free_blocks"] == 64
    return [o.outputs[0] for o in outs]


@needs_c
def test_greedy_tokens_are_the_same_with_and_without_the_screen(tiny_path, monkeypatch):
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    screened = generate(tiny_path, plain)
    monkeypatch.setenv(greedy_head.SWITCH, "0")
    full = generate(tiny_path, plain)
    # logprobs=0 sends every row through the sampler's own argmax of the full logits
    sampled = generate(tiny_path, SamplingParams(temperature=0, max_tokens=12,
                                                 ignore_eos=True, logprobs=0))
    assert [c.token_ids for c in screened] == [c.token_ids for c in full]
    assert [c.token_ids for c in screened] == [c.token_ids for c in sampled]


@needs_c
def test_a_greedy_request_reports_a_cumulative_logprob_only_with_logprobs(tiny_path):
    plain = generate(tiny_path, SamplingParams(temperature=0, max_tokens=4))
    asked = generate(tiny_path, SamplingParams(temperature=0, max_tokens=4, logprobs=0))
    assert all(c.cumulative_logprob is None and c.logprobs is None for c in plain)
    for c in asked:
        assert c.cumulative_logprob == pytest.approx(sum(d[t] for d, t in
                                                         zip(c.logprobs, c.token_ids)))


@needs_c
def test_a_batch_mixing_screened_and_sampled_rows_keeps_each_rows_tokens(tiny_path):
    """Screened rows, rows with full logits and rows with prompt logprobs in one step:
    the runner's ModelOutput must hand each row its own result."""
    llm = LLM(model=str(tiny_path), max_model_len=128, seed=0, num_gpu_blocks=64,
              enable_prefix_caching=False)
    kinds = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1),
             SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=1),
             SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                            repetition_penalty=1.0001)]
    mixed = llm.generate(PROMPTS, kinds, use_tqdm=False)
    alone = [llm.generate([p], k, use_tqdm=False)[0] for p, k in zip(PROMPTS, kinds)]
    assert [o.outputs[0].token_ids for o in mixed] == [o.outputs[0].token_ids for o in alone]
    assert llm.stats()["num_free_blocks"] == 64
