"""Sequences, groups, stop conditions and request outputs."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipaged.outputs import RequestOutput
from minipaged.sampling import SamplingParams
from minipaged.sequence import (
    Sequence,
    SequenceGroup,
    SequenceStatus,
    make_seq_id_counter,
)
from minipaged.stop import check_stop

EOS = 2


def running_seq(prompt=(10, 11, 12), seq_id=0, **kw):
    seq = Sequence(seq_id, prompt, eos_token_ids={EOS}, **kw)
    seq.status = SequenceStatus.RUNNING
    return seq


def append(seq, token, text="", logprob=-1.0):
    seq.append_token(token, {token: logprob})
    seq.output_text += text
    return len(text)


# -- Sequence ------------------------------------------------------------------------------


def test_fork_copies_the_token_state_and_the_copies_grow_independently():
    parent = running_seq(return_logprobs=True)
    append(parent, 5, "a", -0.5)
    parent.num_computed_tokens = 3
    child = parent.fork(7)
    assert child.seq_id == 7 and parent.seq_id == 0
    assert (child.get_token_ids(), child.cumulative_logprob, child.output_text) == (
        [10, 11, 12, 5], -0.5, "a")
    assert (child.num_computed_tokens, child.status) == (3, SequenceStatus.RUNNING)
    append(child, 6, "b", -1.0)
    append(parent, 8, "c", -2.0)
    assert parent.get_token_ids() == [10, 11, 12, 5, 8] and parent.output_text == "ac"
    assert child.get_token_ids() == [10, 11, 12, 5, 6] and child.output_text == "ab"
    assert parent.output_logprobs == [{5: -0.5}, {8: -2.0}]
    assert child.output_logprobs == [{5: -0.5}, {6: -1.0}]
    assert (parent.cumulative_logprob, child.cumulative_logprob) == (-2.5, -1.5)


def test_lengths_and_last_token():
    seq = running_seq()
    assert (seq.get_len(), seq.get_prompt_len(), seq.get_output_len()) == (3, 3, 0)
    assert seq.last_token_id == 12
    append(seq, 4)
    assert (seq.get_len(), seq.get_output_len(), seq.last_token_id) == (4, 1, 4)


def test_append_token_sums_the_logprob_and_keeps_dicts_only_when_requested():
    seq = running_seq()
    seq.append_token(4, {4: -0.25, 9: -3.0})
    seq.append_token(9, {9: -0.5})
    assert seq.cumulative_logprob == -0.75  # exact: dyadic fractions
    assert seq.output_logprobs is None
    with_lp = running_seq(return_logprobs=True)
    with_lp.append_token(4, {4: -0.25, 9: -3.0})
    assert with_lp.output_logprobs == [{4: -0.25, 9: -3.0}]


def test_append_token_requires_the_token_in_its_logprobs():
    with pytest.raises(ValueError, match="logprobs"):
        running_seq().append_token(4, {5: -1.0})


def test_an_empty_prompt_is_rejected():
    with pytest.raises(ValueError, match="prompt_token_ids"):
        Sequence(0, [])


def test_reset_for_recompute_keeps_the_tokens_but_forgets_the_cache():
    seq = running_seq()
    append(seq, 4)
    seq.num_computed_tokens = 3
    seq.reset_for_recompute()
    assert seq.get_token_ids() == [10, 11, 12, 4]
    assert seq.num_computed_tokens == 0 and seq.status == SequenceStatus.WAITING
    assert seq.get_num_uncomputed_tokens() == 4  # prompt and output are prefilled together


def test_mark_computed_never_goes_past_the_length():
    seq = running_seq()
    seq.mark_computed(3)
    assert seq.get_num_uncomputed_tokens() == 0
    with pytest.raises(ValueError, match="num_tokens"):
        seq.mark_computed(1)


@pytest.mark.parametrize("status,finished,reason", [
    (SequenceStatus.WAITING, False, None),
    (SequenceStatus.RUNNING, False, None),
    (SequenceStatus.SWAPPED, False, None),
    (SequenceStatus.FINISHED_STOPPED, True, "stop"),
    (SequenceStatus.FINISHED_LENGTH, True, "length"),
    (SequenceStatus.FINISHED_ABORTED, True, "abort"),
])
def test_statuses_and_finish_reasons(status, finished, reason):
    assert SequenceStatus.is_finished(status) is finished
    assert SequenceStatus.finish_reason(status) == reason
    seq = running_seq()
    seq.status = status
    assert seq.is_finished() is finished and seq.finish_reason == reason


def test_beam_score_counts_the_prompt_but_not_a_final_eos():
    seq = running_seq()  # prompt of 3
    append(seq, 4, logprob=-1.0)
    append(seq, EOS, logprob=-2.0)
    # length 5, minus the EOS: -3 / 4 ** 2; exact in binary
    assert seq.get_beam_search_score(length_penalty=2.0) == -3.0 / 16
    assert seq.get_beam_search_score(length_penalty=0.0) == -3.0


# -- SequenceGroup -------------------------------------------------------------------------


def make_group(n_seqs=3, params=None):
    counter = make_seq_id_counter(100)
    group = SequenceGroup.from_prompt("req", [1, 2], params or SamplingParams(n=n_seqs), counter,
                                      prompt="hi", arrival_time=10.0)
    first = group.seqs[0]
    for _ in range(n_seqs - 1):
        group.add(first.fork(counter()))
    return group


def test_group_counts_sequences_by_status():
    group = make_group(3)
    a, b, c = group.seqs
    a.status, b.status, c.status = (SequenceStatus.RUNNING, SequenceStatus.RUNNING,
                                    SequenceStatus.FINISHED_LENGTH)
    assert [s.seq_id for s in group.get_seqs(SequenceStatus.RUNNING)] == [a.seq_id, b.seq_id]
    assert group.num_seqs() == 3 and group.num_seqs(SequenceStatus.RUNNING) == 2
    assert group.get_unfinished_seqs() == [a, b] and group.num_unfinished_seqs() == 2
    assert not group.is_finished()
    assert group.abort() == [a, b]
    assert group.is_finished() and a.finish_reason == "abort"


def test_group_add_and_remove_by_seq_id():
    group = make_group(2)
    first = group.seqs[0]
    with pytest.raises(ValueError, match="seq_id"):
        group.add(first)
    assert group.remove(first.seq_id) is first and group.num_seqs() == 1
    with pytest.raises(ValueError, match="seq_id"):
        group.find(first.seq_id)


def test_max_running_seqs_budgets_the_best_of_fork_before_it_happens():
    group = make_group(1, SamplingParams(n=2, best_of=4))
    assert group.get_max_num_running_seqs() == 4
    beams = make_group(1, SamplingParams(n=2, best_of=3, use_beam_search=True, temperature=0.0))
    assert beams.get_max_num_running_seqs() == 3


def test_a_seeded_request_owns_a_generator_seeded_with_its_seed():
    a = make_group(1, SamplingParams(seed=5)).generator
    b = make_group(1, SamplingParams(seed=5)).generator
    assert a is not b and a.initial_seed() == b.initial_seed() == 5
    assert make_group(1).generator is None


def test_metrics_record_the_first_schedule_token_and_finish():
    group = make_group(1)
    group.mark_scheduled(12.0)
    group.mark_scheduled(13.0)       # only the first counts
    group.mark_token(14.0)
    group.mark_token(15.0)
    group.mark_finished(16.0)
    m = group.metrics
    assert (m.arrival_time, m.first_scheduled_time, m.first_token_time, m.last_token_time,
            m.finished_time, m.time_in_queue) == (10.0, 12.0, 14.0, 15.0, 16.0, 2.0)


# -- check_stop ----------------------------------------------------------------------------


def test_eos_stops_with_reason_stop():
    seq, params = running_seq(), SamplingParams()
    append(seq, 4)
    assert check_stop(seq, params, {EOS}, 100) is None
    append(seq, EOS)
    assert check_stop(seq, params, {EOS}, 100) == SequenceStatus.FINISHED_STOPPED
    assert seq.status == SequenceStatus.FINISHED_STOPPED and seq.stop_reason is None


def test_eos_is_ignored_with_ignore_eos():
    seq = running_seq()
    append(seq, EOS)
    assert check_stop(seq, SamplingParams(ignore_eos=True), {EOS}, 100) is None
    assert seq.status == SequenceStatus.RUNNING


def test_eos_text_is_removed_unless_stop_strings_are_kept():
    seq = running_seq()
    n = append(seq, 4, "hello")
    n = append(seq, EOS, "</s>")
    check_stop(seq, SamplingParams(), {EOS}, 100, new_char_count=n)
    assert seq.output_text == "hello"


def test_a_stop_token_id_stops_and_is_the_stop_reason():
    seq = running_seq()
    append(seq, 7)
    status = check_stop(seq, SamplingParams(stop_token_ids=[7]), {EOS}, 100)
    assert status == SequenceStatus.FINISHED_STOPPED
    assert seq.stop_reason == 7 and seq.finish_reason == "stop"


def test_a_stop_string_is_trimmed_from_the_text():
    seq, params = running_seq(), SamplingParams(stop=["###"])
    for token, text in [(4, "The answer"), (5, " is 4#"), (6, "## and more")]:
        n = append(seq, token, text)
        status = check_stop(seq, params, {EOS}, 100, new_char_count=n)
    assert status == SequenceStatus.FINISHED_STOPPED
    assert seq.output_text == "The answer is 4" and seq.stop_reason == "###"


def test_a_stop_string_is_kept_with_include_stop_str_in_output():
    seq, params = running_seq(), SamplingParams(stop="###", include_stop_str_in_output=True)
    n = append(seq, 4, "4 ### tail")
    assert check_stop(seq, params, {EOS}, 100, new_char_count=n) == SequenceStatus.FINISHED_STOPPED
    assert seq.output_text == "4 ###"


def test_the_stop_string_that_starts_first_wins():
    seq, params = running_seq(), SamplingParams(stop=["world", "lo"])
    n = append(seq, 4, "hello world")
    check_stop(seq, params, {EOS}, 100, new_char_count=n)
    assert seq.output_text == "hel" and seq.stop_reason == "lo"


@given(st.lists(st.text(alphabet="ab#", max_size=4), max_size=12),
       st.sampled_from(["#", "##", "a#b"]))
def test_checking_token_by_token_finds_the_first_stop_string_in_the_whole_text(pieces, stop):
    seq, params = running_seq(), SamplingParams(stop=[stop], max_tokens=None)
    for i, piece in enumerate(pieces):
        n = append(seq, 4, piece)
        if check_stop(seq, params, {EOS}, 1000, new_char_count=n) is not None:
            break
    full = "".join(pieces)
    cut = full.find(stop)
    if cut == -1:
        assert seq.status == SequenceStatus.RUNNING and seq.output_text == full
    else:
        assert seq.status == SequenceStatus.FINISHED_STOPPED and seq.output_text == full[:cut]


def test_min_tokens_delays_every_stop_condition_but_a_full_context():
    params = SamplingParams(min_tokens=3, stop=["x"], stop_token_ids=[7])
    seq = running_seq()
    for token, text in [(EOS, ""), (7, ""), (4, "x")]:
        n = append(seq, token, text)
        if seq.get_output_len() < 3:
            assert check_stop(seq, params, {EOS}, 100, new_char_count=n) is None
    assert check_stop(seq, params, {EOS}, 100, new_char_count=n) == SequenceStatus.FINISHED_STOPPED
    full = running_seq()
    append(full, EOS)
    assert check_stop(full, params, {EOS}, max_model_len=3) == SequenceStatus.FINISHED_LENGTH


def test_max_tokens_finishes_with_reason_length():
    seq, params = running_seq(), SamplingParams(max_tokens=2)
    append(seq, 4)
    assert check_stop(seq, params, {EOS}, 100) is None
    append(seq, 5)
    assert check_stop(seq, params, {EOS}, 100) == SequenceStatus.FINISHED_LENGTH
    assert seq.finish_reason == "length" and seq.stop_reason is None


def test_without_max_tokens_a_sequence_runs_until_the_context_is_full():
    # a context of 5 holds 5 tokens; the token sampled from a full context ends it
    seq, params = running_seq(), SamplingParams(max_tokens=None)
    for token in (4, 5):
        append(seq, token)
        assert check_stop(seq, params, {EOS}, max_model_len=5) is None
    append(seq, 6)
    assert check_stop(seq, params, {EOS}, max_model_len=5) == SequenceStatus.FINISHED_LENGTH


def test_eos_ids_default_to_the_sequences_own():
    seq = running_seq()
    append(seq, EOS)
    assert check_stop(seq, SamplingParams()) == SequenceStatus.FINISHED_STOPPED


# -- RequestOutput -------------------------------------------------------------------------


def test_best_of_returns_the_n_sequences_with_the_highest_cumulative_logprob():
    group = make_group(4, SamplingParams(n=2, best_of=4))
    for seq, lp in zip(group.seqs, [-3.0, -1.0, -4.0, -2.0]):
        append(seq, 5, f"t{lp}", lp)
        seq.status = SequenceStatus.FINISHED_LENGTH
    out = RequestOutput.from_seq_group(group)
    assert out.finished and [o.cumulative_logprob for o in out.outputs] == [-1.0, -2.0]
    assert [o.index for o in out.outputs] == [1, 3]
    assert [o.finish_reason for o in out.outputs] == ["length", "length"]


def test_beam_search_returns_the_n_best_beam_scores():
    params = SamplingParams(n=1, best_of=2, use_beam_search=True, temperature=0.0,
                            length_penalty=1.0)
    group = make_group(2, params)
    short, long = group.seqs  # prompt of 2
    append(short, EOS, "", -2.0)          # score -2 / 2 (EOS not counted)
    append(long, 4, "", -1.2)
    append(long, 5, "", -1.2)             # score -2.4 / 4
    for s in group.seqs:
        s.status = SequenceStatus.FINISHED_STOPPED
    assert RequestOutput.from_seq_group(group).outputs[0].token_ids == [4, 5]


def test_request_output_copies_the_state_and_reads_well():
    group = make_group(1, SamplingParams(logprobs=1))
    seq = group.seqs[0]
    append(seq, 5, "Paris", -0.125)
    out = RequestOutput.from_seq_group(group)
    append(seq, 6, "!", -1.0)
    assert out.outputs[0].token_ids == [5] and out.outputs[0].text == "Paris"
    assert out.outputs[0].logprobs == [{5: -0.125}]
    assert not out.finished and out.outputs[0].finish_reason is None
    text = repr(out)
    assert "request_id='req'" in text and "text='Paris'" in text
    assert "cumulative_logprob=-0.1250" in text
