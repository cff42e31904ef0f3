"""Request-length traces shaped like the paper's workloads (Fig. 11) and their replay."""

from __future__ import annotations

import math

import numpy as np
import pytest

from minipaged.core.block_manager import BlockManager
from minipaged.core.replay import contiguous_factory, paged_factory, replay
from minipaged.core.trace import TRACE_SHAPES, Request, capped_lognormal_mean, fit_mu, make_trace


def lengths(trace):
    return (np.array([r.prompt_len for r in trace]), np.array([r.output_len for r in trace]))


@pytest.mark.parametrize("name", ["alpaca", "sharegpt"])
def test_trace_means_match_the_papers_workload_means(name):
    prompt, output = lengths(make_trace(name, 20_000, seed=0))
    shape = TRACE_SHAPES[name]
    # 3 % relative: >= 3 standard errors of a 20k-sample mean for ShareGPT's CV of ~1.2
    assert prompt.mean() == pytest.approx(shape.mean_prompt, rel=0.03)
    assert output.mean() == pytest.approx(shape.mean_output, rel=0.03)


def test_sharegpt_lengths_vary_more_than_alpaca_lengths():
    a_prompt, a_output = lengths(make_trace("alpaca", 5_000, seed=1))
    s_prompt, s_output = lengths(make_trace("sharegpt", 5_000, seed=1))
    cv = lambda x: x.std() / x.mean()  # noqa: E731
    assert cv(s_prompt) > 1.5 * cv(a_prompt)   # lognormal CVs 1.31 vs 0.66 before capping
    assert cv(s_output) > 1.5 * cv(a_output)


@pytest.mark.parametrize("max_len", [2, 64, 2048])
def test_every_request_fits_the_context_with_at_least_one_prompt_and_one_output_token(max_len):
    prompt, output = lengths(make_trace("sharegpt", 3_000, seed=2, max_len=max_len))
    assert prompt.min() >= 1 and output.min() >= 1
    assert (prompt + output).max() <= max_len


def test_a_trace_is_deterministic_per_seed():
    assert make_trace("sharegpt", 200, seed=7, request_rate=2.0) == \
        make_trace("sharegpt", 200, seed=7, request_rate=2.0)
    assert make_trace("sharegpt", 200, seed=7) != make_trace("sharegpt", 200, seed=8)


def test_without_a_rate_every_request_arrives_at_time_zero():
    assert {r.arrival_time for r in make_trace("alpaca", 50)} == {0.0}


def test_with_a_rate_arrivals_are_a_poisson_process_of_that_rate():
    times = np.array([r.arrival_time for r in make_trace("alpaca", 20_000, request_rate=4.0)])
    gaps = np.diff(np.concatenate([[0.0], times]))
    assert np.all(gaps >= 0)
    # mean gap 1/rate within 3 % (standard error of the mean gap: 0.7 %)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    # exponential gaps: standard deviation equals the mean (within 5 %)
    assert gaps.std() == pytest.approx(gaps.mean(), rel=0.05)


def test_fitted_mu_makes_the_capped_mean_the_target():
    mu = fit_mu(338.0, 1.0, cap=1887.0)
    # bisection of 60 halvings: the closed form meets the target to 1e-6
    assert capped_lognormal_mean(mu, 1.0, 1887.0) == pytest.approx(338.0, abs=1e-6)
    assert mu > math.log(338.0) - 0.5   # the cap cost mean, so mu moved up


def test_capped_mean_with_a_far_cap_is_the_lognormal_mean():
    # a cap 1e6 times the mean removes nothing measurable (relative 1e-9)
    assert capped_lognormal_mean(2.0, 0.6, 1e9) == pytest.approx(math.exp(2.0 + 0.18), rel=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [(dict(name="imdb"), "name"), (dict(num_requests=-1), "num_requests"),
     (dict(max_len=1), "max_len"), (dict(request_rate=0.0), "request_rate")],
)
def test_bad_trace_arguments_raise_value_error_naming_them(kwargs, name):
    args = dict(name="alpaca", num_requests=10) | kwargs
    with pytest.raises(ValueError, match=name):
        make_trace(**args)


# ---- replay --------------------------------------------------------------------------


def test_replay_of_two_requests_through_oracle_step_by_step():
    # A: 2 + 3 tokens (reserves 5), B: 2 + 2 (reserves 4), in 10 slots.
    # step 0: both admitted with their prompts; steps 1-2 grow; B done after step 2
    # (4 tokens), A after step 3 (5 tokens).
    trace = [Request(2, 3), Request(2, 2)]
    result = replay(trace, contiguous_factory("oracle", max_len=8), capacity_tokens=10)
    assert [r.num_running for r in result.records] == [2, 2, 2, 1]
    assert [r.report.token_state for r in result.records] == [4, 6, 8, 5]
    assert [r.report.reserved_unused for r in result.records] == [5, 3, 1, 0]
    assert [r.report.free for r in result.records] == [1, 1, 1, 5]
    assert (result.num_finished, result.mean_batch, result.peak_batch) == (2, 1.75, 2)
    assert result.mean_utilisation == pytest.approx(np.mean([4 / 9, 6 / 9, 8 / 9, 1.0]),
                                                    abs=1e-12)


def test_orca_max_runs_one_request_at_a_time_when_memory_holds_one_max_len():
    trace = [Request(2, 3), Request(2, 2), Request(1, 1)]
    result = replay(trace, contiguous_factory("max", max_len=8), capacity_tokens=15)
    assert result.peak_batch == 1
    assert result.num_finished == 3
    assert result.num_steps == 4 + 3 + 2   # each runs output_len + 1 steps, one after another


def test_replay_waits_for_arrivals_and_skips_idle_time():
    trace = [Request(2, 2, arrival_time=0.0), Request(2, 2, arrival_time=10.0)]
    result = replay(trace, contiguous_factory("oracle", max_len=8), 10, step_seconds=1.0)
    assert [r.step for r in result.records] == [0, 1, 2, 10, 11, 12]


def test_paged_replay_preempts_when_blocks_run_out_and_still_finishes_everything():
    made: list[BlockManager] = []

    def factory(capacity):
        made.append(BlockManager(capacity // 4, 4, watermark=0.0))
        return made[-1]

    trace = make_trace("alpaca", 40, seed=3, max_len=64)
    result = replay(trace, factory, capacity_tokens=128)
    assert result.num_preemptions > 0
    assert result.num_finished == 40
    assert made[0].num_free_blocks == made[0].num_blocks   # everything returned


def test_paged_memory_holds_a_bigger_batch_than_orca_max_in_the_same_memory():
    trace = make_trace("alpaca", 100, seed=0, max_len=512)
    orca = replay(trace, contiguous_factory("max", max_len=512), capacity_tokens=2048)
    paged = replay(trace, paged_factory(16), capacity_tokens=2048)
    assert orca.peak_batch == 2048 // 512
    assert paged.mean_batch > 3 * orca.mean_batch
    assert paged.num_steps < orca.num_steps


def test_on_alpaca_paged_utilisation_beats_every_contiguous_baseline():
    # The paper's Fig. 2 ordering, on one seeded trace: Max < Pow2 < Oracle < paged.
    trace = make_trace("alpaca", 150, seed=0, max_len=512)
    util = [replay(trace, f, capacity_tokens=4096).mean_utilisation
            for f in (contiguous_factory("max", 512), contiguous_factory("pow2", 512),
                      contiguous_factory("oracle", 512), paged_factory(16))]
    assert util == sorted(util)
    assert util[-1] > 0.8   # waste under one 16-slot block per ~80-token request


def test_replay_refuses_a_request_that_can_never_fit():
    with pytest.raises(ValueError, match="capacity_tokens"):
        replay([Request(2, 2)], contiguous_factory("max", max_len=16), capacity_tokens=8)
    with pytest.raises(ValueError, match="capacity_tokens"):
        replay([Request(10, 10)], paged_factory(4), capacity_tokens=16)


def test_replay_records_contiguous_external_fragmentation_against_the_waiting_head():
    # Oracle, 10 slots: A(1+2)=3 at [0,3), B(1+5)=6 at [3,9), C(1+5)=6 waits.
    # A finishes after step 2 -> holes [0,3) and [9,10): 4 free slots, none fits C's 6.
    trace = [Request(1, 2), Request(1, 5), Request(1, 5)]
    result = replay(trace, contiguous_factory("oracle", max_len=8), capacity_tokens=10)
    step3 = result.records[3].report
    assert (step3.free, step3.external_fragmentation) == (4, 4)
