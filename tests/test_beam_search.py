"""Beam search: the paged step function, driven in a loop, finds exactly what a plain
reference beam search finds (no sequences, no forks, lists of tokens), with the same
scores; and its fork / free bookkeeping is what the block manager needs (Fig. 9)."""

import numpy as np
import pytest
import torch

from minipaged.beam_search import beam_search_step
from minipaged.outputs import RequestOutput
from minipaged.sampling import SamplingParams
from minipaged.sequence import SequenceGroup, SequenceStatus, make_seq_id_counter

VOCAB, EOS = 12, 0


def toy_model(seed, eos_bias=0.0, vocab=VOCAB):
    """A deterministic 'language model': token prefix -> float64 log-probabilities."""
    def logprobs(tokens):
        rng = np.random.default_rng([seed, len(tokens), *tokens])
        logits = rng.normal(size=vocab) * 2.0
        logits[EOS] += eos_bias
        m = logits.max()
        return logits - (m + np.log(np.exp(logits - m).sum()))
    return logprobs


def reference_beam_search(model, prompt, width, length_penalty, max_tokens, eos,
                          early_stopping=False, max_model_len=0):
    """Textbook beam search with vLLM v0's rules, on plain lists.

    Each round: the best 2*width (beam, token) candidates by cumulative logprob (ties:
    lower beam, then lower token); those ending in EOS or at max_tokens are hypotheses,
    scored cum / len ** length_penalty (len = prompt + output, a final EOS not counted);
    the best width hypotheses are kept; the best width others continue, unless no live
    one can beat the worst kept hypothesis (early_stopping as HF / vLLM)."""
    def score(tokens, cum):
        n = len(tokens) - (1 if len(tokens) > len(prompt) and tokens[-1] == eos else 0)
        return cum / n ** length_penalty

    live, hyps = [(list(prompt), 0.0)], []
    while True:
        cands = []
        for b, (tokens, cum) in enumerate(live):
            lp = model(tokens)
            cands += [(cum + lp[t], b * len(lp) + t, tokens + [t]) for t in range(len(lp))]
        cands.sort(key=lambda c: (-c[0], c[1]))
        cands = cands[: 2 * width]
        ends = [t[-1] == eos or len(t) - len(prompt) >= max_tokens for _, _, t in cands]
        hyps = hyps + [(t, c) for (c, _, t), e in zip(cands, ends) if e]
        hyps.sort(key=lambda h: score(*h), reverse=True)   # stable: earlier ones first on ties
        n_hyps, hyps = len(hyps), hyps[:width]
        running = [(t, c) for (c, _, t), e in zip(cands, ends) if not e]
        running.sort(key=lambda h: score(*h), reverse=True)
        if not running:
            break
        if n_hyps >= width:
            if early_stopping is True:
                break
            tokens, cum = running[0]
            if early_stopping == "never" and length_penalty > 0:
                best = cum / max(len(prompt) + max_tokens, max_model_len) ** length_penalty
            else:
                best = score(tokens, cum)
            if score(*hyps[-1]) >= best:
                break
        live = running[:width]
    return [(t[len(prompt):], c, score(t, c)) for t, c in hyps]


def run_paged_beam_search(model, prompt, params, eos_ids=(EOS,), on_step=None):
    counter = make_seq_id_counter()
    group = SequenceGroup.from_prompt("r", prompt, params, counter, eos_token_ids=eos_ids)
    group.seqs[0].status = SequenceStatus.RUNNING
    while not group.is_finished():
        parents = group.get_seqs(SequenceStatus.RUNNING)
        before = {s.seq_id: s.get_token_ids() for s in parents}
        logprobs = torch.tensor(np.stack([model(s.get_token_ids()) for s in parents]))
        step = beam_search_step(group, parents, logprobs, counter)
        if on_step:
            on_step(group, step, before)
    return group


def finished_beams(group, length_penalty):
    seqs = sorted(group.get_seqs(), key=lambda s: s.get_beam_search_score(length_penalty),
                  reverse=True)
    return [(s.output_token_ids, s.cumulative_logprob, s.get_beam_search_score(length_penalty))
            for s in seqs]


CASES = [(seed, bias) for seed in range(3) for bias in (-1.0, 1.5)]


@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_paged_beam_search_finds_exactly_the_reference_beams_and_scores(
        width, length_penalty, early_stopping):
    for seed, eos_bias in CASES:
        model, prompt = toy_model(seed, eos_bias), [3 + seed, 5, 7]
        params = SamplingParams(n=width, use_beam_search=True, temperature=0.0, max_tokens=6,
                                length_penalty=length_penalty, early_stopping=early_stopping)
        group = run_paged_beam_search(model, prompt, params)
        expected = reference_beam_search(model, prompt, width, length_penalty, 6, EOS,
                                         early_stopping)
        # exact equality: both sum the same float64 logprobs in the same order
        assert finished_beams(group, length_penalty) == expected, (seed, eos_bias)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_width_one_without_eos_is_greedy_decoding(length_penalty):
    # (with an EOS, a width-1 beam may keep an early EOS hypothesis greedy would not take)
    for seed in range(4):
        model, prompt = toy_model(seed), [1, 2]
        params = SamplingParams(use_beam_search=True, temperature=0.0, max_tokens=8,
                                length_penalty=length_penalty)
        group = run_paged_beam_search(model, prompt, params, eos_ids=())
        tokens = list(prompt)
        for _ in range(8):
            tokens.append(int(np.argmax(model(tokens))))
        (best,) = group.get_seqs()
        assert best.output_token_ids == tokens[2:]


def test_each_step_forks_kept_candidates_from_their_parent_and_frees_dropped_parents():
    width = 3
    params = SamplingParams(n=2, best_of=width, use_beam_search=True, temperature=0.0, max_tokens=7)
    seen_forks = []

    def check(group, step, before):
        running = group.get_seqs(SequenceStatus.RUNNING)
        assert len(running) <= width and len({s.get_len() for s in running}) <= 1
        assert len(group.get_finished_seqs()) <= width
        continuing = {b.seq_id for b in step.beams if b.seq_id == b.parent_seq_id}
        for parent_id, child_id in step.forks:
            # a fork child is its parent's old tokens plus one: it can share every block
            assert group.find(child_id).get_token_ids()[:-1] == before[parent_id]
            assert parent_id in continuing
            seen_forks.append(child_id)
        for parent_id in continuing:
            assert group.find(parent_id).get_token_ids()[:-1] == before[parent_id]
        for seq_id in step.freed + step.removed:
            assert seq_id not in group.seqs_dict
        assert set(step.freed) == set(before) - continuing
        if step.done:
            assert not running
        else:
            assert {s.seq_id for s in running} == {b.seq_id for b in step.beams if not b.finished}

    group = run_paged_beam_search(toy_model(7, 0.5), [4, 4, 4], params, on_step=check)
    assert seen_forks, "the toy search should branch at least once"
    assert all(s.is_finished() for s in group.get_seqs())
    assert len(RequestOutput.from_seq_group(group).outputs) == 2


def test_beams_carry_the_top_logprobs_when_requested():
    params = SamplingParams(use_beam_search=True, best_of=2, temperature=0.0, max_tokens=2,
                            logprobs=3)
    model = toy_model(1)
    group = run_paged_beam_search(model, [1], params)
    for seq in group.get_seqs():
        first = seq.output_logprobs[0]
        top3 = set(np.argsort(-model([1]))[:3].tolist())
        assert set(first) == top3 | {seq.output_token_ids[0]}


def test_a_group_without_beam_search_is_rejected():
    counter = make_seq_id_counter()
    group = SequenceGroup.from_prompt("r", [1], SamplingParams(), counter)
    with pytest.raises(ValueError, match="use_beam_search"):
        beam_search_step(group, group.seqs, torch.zeros(1, VOCAB), counter)
