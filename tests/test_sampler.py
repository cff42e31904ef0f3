"""The sampler: logits processing (penalties, min_tokens, temperature, top-k/p, min-p),
greedy and random draws, seeds, logprobs, and the fork that starts parallel sampling.

References are written plainly in NumPy here, independently of the torch code."""

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import minipaged.logits_processing as logits_processing
import minipaged.sampler as sampler_module
from minipaged.sampler import Sample, Sampler, SamplingRow, fork_parallel_samples
from minipaged.sampling import SamplingParams
from minipaged.sequence import SequenceGroup, SequenceStatus, make_seq_id_counter
from tests.strategies import distinct_logits, sampler_vocab_sizes, temperatures

EOS = 0


def row(params=None, prompt=(1, 2, 3), output=(), generator=None, num_samples=1, **kw):
    params = params or SamplingParams(**kw)
    if params.seed is not None and generator is None:
        generator = torch.Generator().manual_seed(params.seed)
    return SamplingRow(params, list(prompt), list(output), generator, num_samples)


def np_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def np_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def kept(processed: torch.Tensor) -> set:
    return set(torch.nonzero(torch.isfinite(processed)).flatten().tolist())


# -- greedy and truncation -----------------------------------------------------------------


@given(distinct_logits())
def test_greedy_picks_the_argmax(logits):
    out = Sampler()(torch.tensor([logits]), [row(temperature=0.0)])
    assert out.samples[0][0].token_id == int(np.argmax(logits))


@given(sampler_vocab_sizes.flatmap(
    lambda n: st.lists(distinct_logits(vocab_size=n), min_size=1, max_size=4)))
def test_greedy_rows_get_the_same_tokens_and_logprobs_with_or_without_the_c_reduction(rows):
    logits = torch.tensor(rows, dtype=torch.float32)
    params = [row(temperature=0.0, logprobs=2) for _ in rows]
    fast = Sampler()(logits, params)
    with mock.patch.object(sampler_module.cpu_layers, "argmax_logsumexp", lambda x: None):
        portable = Sampler()(logits, params)        # torch's argmax and logsumexp
    for a, b in zip(fast.samples, portable.samples):
        assert a[0].token_id == b[0].token_id
        # two float32 log-sum-exps of the same row: measured worst 1e-7 at |x| <~ 100
        assert a[0].logprob == pytest.approx(b[0].logprob, abs=1e-5)
        assert a[0].logprobs.keys() == b[0].logprobs.keys()


@given(distinct_logits(), temperatures, st.integers(0, 2**31 - 1))
def test_top_k_1_samples_the_argmax_like_greedy(logits, temperature, seed):
    rows = [row(temperature=temperature, top_k=1, seed=seed), row(temperature=0.0)]
    out = Sampler(seed=0)(torch.tensor([logits, logits]), rows)
    assert out.samples[0][0].token_id == out.samples[1][0].token_id == int(np.argmax(logits))


@given(distinct_logits(), st.integers(1, 45))
def test_top_k_keeps_exactly_the_k_largest_logits(logits, k):
    processed = Sampler().process_logits(torch.tensor([logits]), [row(top_k=k)])[0]
    assert kept(processed) == set(np.argsort(logits)[::-1][:k].tolist())


def reference_top_p(logits, temperature, p):
    """Tokens by decreasing probability, kept while the mass before them is below p."""
    probs = np_softmax(np.asarray(logits) / temperature)
    order = np.argsort(-probs, kind="stable")
    keep, mass_before = set(), 0.0
    for t in order:
        if mass_before >= p:
            break
        keep.add(int(t))
        mass_before += probs[t]
    return keep, probs[order].cumsum()


@given(distinct_logits(), temperatures, st.floats(0.01, 0.99), st.sampled_from([2, 5, 256]))
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(logits, temperature, p, candidates):
    expected, cumulative = reference_top_p(logits, temperature, p)
    # float32 (ours) vs float64 (reference) cumulative sums: skip draws that put a
    # boundary within 1e-5 of p, where rounding may legitimately decide differently
    assume(np.all(np.abs(cumulative - p) > 1e-5))
    # a small candidate count forces the second pass (full sort) on rows it cannot settle
    with mock.patch.object(logits_processing, "TOP_P_CANDIDATES", candidates):
        processed = Sampler().process_logits(
            torch.tensor([logits]), [row(temperature=temperature, top_p=p)])[0]
    assert kept(processed) == expected


@given(distinct_logits(), st.floats(0.01, 1.0))
def test_min_p_drops_tokens_below_min_p_times_the_top_probability(logits, min_p):
    probs = np_softmax(logits)
    threshold = min_p * probs.max()
    assume(np.all(np.abs(probs - threshold) > 1e-6 * probs.max()))  # float32 vs float64
    processed = Sampler().process_logits(torch.tensor([logits]), [row(min_p=min_p)])[0]
    assert kept(processed) == set(np.nonzero(probs >= threshold)[0].tolist())


def test_top_k_then_top_p_renormalises_over_the_top_k_tokens():
    # top-3 of [4,3,2,1,0] is {0,1,2}; renormalised over those, token 0 has ~0.665 < 0.7
    # and tokens 0+1 ~0.91 >= 0.7, so top-p keeps {0, 1}
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    processed = Sampler().process_logits(logits, [row(top_k=3, top_p=0.7)])[0]
    assert kept(processed) == {0, 1}


# -- penalties -----------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 5.0, -4.0]])
    # token 0 (positive) and 1 (negative) in the prompt, 3 (negative) in the output
    r = row(repetition_penalty=2.0, prompt=[0, 1], output=[3, 3])
    processed = Sampler().process_logits(logits, [r])[0]
    # exact: division and multiplication by 2 are exact in float32
    assert processed.tolist() == [1.0, -4.0, 3.0, -2.0, 5.0, -4.0]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    r = row(presence_penalty=0.5, frequency_penalty=0.25, prompt=[0, 1], output=[1, 2, 2, 2])
    processed = Sampler().process_logits(logits, [r])[0]
    # token 0: prompt only -> unchanged; 1: once -> 1 - 0.5 - 0.25; 2: thrice -> 1 - 0.5 - 0.75
    assert processed.tolist() == [1.0, 0.25, -0.25, 1.0]  # exact: dyadic fractions


def test_penalties_of_one_row_do_not_touch_the_others():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    rows = [row(repetition_penalty=1.5, frequency_penalty=1.0, output=[0, 1, 2]),
            row(output=[0, 1, 2])]
    processed = Sampler().process_logits(logits, rows)
    assert processed[1].tolist() == [1.0, 2.0, 3.0]
    assert processed[0].tolist() != [1.0, 2.0, 3.0]


# -- min_tokens ----------------------------------------------------------------------------


def test_min_tokens_blocks_eos_and_stop_token_ids_until_reached():
    sampler = Sampler(eos_token_ids=[EOS])
    logits = torch.tensor([[10.0, 9.0, 1.0, 0.0]])  # EOS (0), then stop token 1, are the best
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[1])
    for n_out, expected in [(0, 2), (2, 2), (3, EOS)]:
        out = sampler(logits, [row(params, output=[3] * n_out)])
        assert out.samples[0][0].token_id == expected


def test_min_tokens_leaves_eos_alone_when_eos_is_ignored():
    out = Sampler(eos_token_ids=[EOS])(
        torch.tensor([[10.0, 1.0]]), [row(temperature=0.0, min_tokens=2, ignore_eos=True)])
    assert out.samples[0][0].token_id == EOS


# -- logprobs ------------------------------------------------------------------------------


@given(distinct_logits(), temperatures, st.integers(0, 5))
def test_logprobs_are_the_log_softmax_of_the_processed_logits_and_include_the_chosen_token(
        logits, temperature, k):
    out = Sampler(seed=1)(torch.tensor([logits]), [row(temperature=temperature, logprobs=k)])
    expected = np_log_softmax(np.asarray(logits) / temperature)
    # float32 log-softmax of logits within [-64, 64]: absolute error well below 1e-4
    np.testing.assert_allclose(out.logprobs[0].numpy(), expected, atol=1e-4)
    sample = out.samples[0][0]
    top_k = set(np.argsort(-expected, kind="stable")[:k].tolist())
    assert set(sample.logprobs) == top_k | {sample.token_id}
    assert sample.logprobs[sample.token_id] == sample.logprob
    for token, lp in sample.logprobs.items():
        assert abs(lp - expected[token]) < 1e-4  # same float32 tolerance


def test_without_logprobs_the_dict_holds_only_the_chosen_token():
    out = Sampler()(torch.tensor([[0.0, 1.0, 2.0]]), [row(temperature=0.0)])
    assert out.samples[0][0].logprobs == {2: out.samples[0][0].logprob}


def test_tokens_cut_by_top_k_have_minus_infinity_logprob():
    out = Sampler()(torch.tensor([[0.0, 1.0, 2.0]]), [row(top_k=1)])
    assert out.logprobs[0, 0] == -np.inf and out.logprobs[0, 2] == 0.0


def test_beam_rows_get_no_samples_and_logprobs_of_the_penalised_logits():
    params = SamplingParams(use_beam_search=True, temperature=0.0, best_of=2,
                            repetition_penalty=2.0)
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    out = Sampler()(logits, [row(params, prompt=[2])])
    assert out.samples == [[]]
    # token 2 was seen: 3 / 2; temperature 1 for beam rows; float32 tolerance
    np.testing.assert_allclose(out.logprobs[0].numpy(), np_log_softmax([1.0, 2.0, 1.5]), atol=1e-6)
    assert torch.equal(out.row_logprobs([0]), out.logprobs[[0]])


def test_the_callers_logits_are_not_modified():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    Sampler()(logits, [row(repetition_penalty=2.0, top_k=1, temperature=0.5, output=[2])])
    assert logits.tolist() == [[1.0, 2.0, 3.0]]


# -- randomness ----------------------------------------------------------------------------


def draw_tokens(sampler, logits, seeded_row, others, position, steps):
    """The seeded row's tokens over `steps` calls, placed at `position` among `others`."""
    rows = others[:position] + [seeded_row] + others[position:]
    other_logits = list(torch.randn(len(others), logits.shape[0]))
    batch = torch.stack(other_logits[:position] + [logits] + other_logits[position:])
    return [sampler(batch, rows).samples[position][0].token_id for _ in range(steps)]


@settings(max_examples=25)  # each example runs 16 sampler calls
@given(st.integers(0, 2**31 - 1), st.integers(0, 4), st.integers(0, 4))
def test_same_seed_gives_the_same_tokens_whatever_else_is_in_the_batch(seed, n_before, n_after):
    torch.manual_seed(0)
    logits = torch.randn(50)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
    alone = draw_tokens(Sampler(seed=1), logits, row(params), [], 0, 8)
    others = [row(temperature=1.0), row(temperature=0.0), row(seed=seed + 1), row(top_k=3),
              row(repetition_penalty=1.3, output=[1, 2])][: n_before + n_after]
    crowded = draw_tokens(Sampler(seed=2), logits, row(params), others, n_before, 8)
    assert alone == crowded


def test_different_seeds_draw_different_tokens():
    logits = torch.zeros(1, 50)  # uniform: 20 equal draws from two seeds has odds 50**-20
    rows_a, rows_b = row(seed=1), row(seed=2)
    a = [Sampler()(logits, [rows_a]).samples[0][0].token_id for _ in range(20)]
    b = [Sampler()(logits, [rows_b]).samples[0][0].token_id for _ in range(20)]
    assert a != b


@pytest.mark.parametrize("temperature,top_k", [(1.0, -1), (0.7, -1), (1.0, 3)])
def test_samples_follow_the_processed_distribution(temperature, top_k):
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0]])
    n = 20_000
    out = Sampler(seed=1234)(logits, [row(temperature=temperature, top_k=top_k, num_samples=n)])
    counts = np.bincount([s.token_id for s in out.samples[0]], minlength=5)
    probs = np.exp(out.logprobs[0].double().numpy())
    support = probs > 0
    assert counts[~support].sum() == 0  # never a token that top-k removed
    expected = probs[support] * n
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    # tolerance: the 99.9th percentile of chi-square with <= 4 degrees of freedom is 18.47;
    # the draw is seeded, so this is deterministic, and a biased sampler lands far above
    assert chi2 < 18.47


def test_a_draw_rounded_onto_the_end_of_the_cdf_never_picks_a_removed_token():
    # u just below 1 makes u * total round to total in float32: the search then runs
    # past the last kept token (1) into tokens that top-k removed (2, 3)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    def almost_one(n, generator=None, dtype=None):
        return torch.full((n,), 1 - 2**-53, dtype=dtype)

    with mock.patch.object(sampler_module.torch, "rand", almost_one):
        out = Sampler()(logits, [row(top_k=2)])
    assert out.samples[0][0].token_id == 1


def test_a_best_of_row_draws_independent_samples():
    logits = torch.zeros(1, 1000)  # uniform: 8 draws from 1000 tokens are all distinct w.p. ~0.97
    out = Sampler(seed=3)(logits, [row(num_samples=8)])
    tokens = [s.token_id for s in out.samples[0]]
    assert len(tokens) == 8 and len(set(tokens)) >= 6


# -- parallel sampling fork ----------------------------------------------------------------


def test_row_for_a_fresh_best_of_sequence_asks_for_best_of_samples():
    counter = make_seq_id_counter()
    group = SequenceGroup.from_prompt("r", [5, 6], SamplingParams(n=2, best_of=3), counter)
    seq = group.seqs[0]
    assert SamplingRow.for_seq(group, seq).num_samples == 3
    seq.append_token(1, {1: -0.5})
    assert SamplingRow.for_seq(group, seq).num_samples == 1


def test_fork_parallel_samples_gives_each_sequence_its_own_first_token():
    counter = make_seq_id_counter()
    group = SequenceGroup.from_prompt("r", [5, 6], SamplingParams(n=3), counter)
    parent = group.seqs[0]
    parent.status = SequenceStatus.RUNNING
    samples = [Sample(7, -0.1, {7: -0.1}), Sample(8, -0.2, {8: -0.2}), Sample(7, -0.1, {7: -0.1})]
    new = fork_parallel_samples(group, parent, samples, counter)
    assert [n.parent_seq_id for n in new] == [parent.seq_id] * 3
    assert new[0].seq_id == parent.seq_id and len({n.seq_id for n in new}) == 3
    assert group.num_seqs(SequenceStatus.RUNNING) == 3
    for n, s in zip(new, samples):
        seq = group.find(n.seq_id)
        assert seq.get_token_ids() == [5, 6, s.token_id]
        assert seq.cumulative_logprob == s.logprob
