"""SamplingParams: vLLM's defaults, its validation (ValueError naming the field), greedy."""

import pytest

from minipaged.sampling import SamplingParams, SamplingType

BEAM = dict(use_beam_search=True, temperature=0.0, best_of=2)

# (field named in the message, keyword arguments that are invalid because of it)
INVALID = [
    ("n", dict(n=0)),
    ("n", dict(n=1.5)),
    ("best_of", dict(n=3, best_of=2)),
    ("best_of", dict(n=2, temperature=0.0)),  # greedy samples would all be equal
    ("temperature", dict(temperature=-0.5)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.01)),
    ("top_k", dict(top_k=0)),
    ("top_k", dict(top_k=-2)),
    ("min_p", dict(min_p=-0.1)),
    ("min_p", dict(min_p=1.5)),
    ("seed", dict(seed="42")),
    ("max_tokens", dict(max_tokens=0)),
    ("max_tokens", dict(max_tokens=-3)),
    ("min_tokens", dict(min_tokens=-1)),
    ("min_tokens", dict(min_tokens=5, max_tokens=4)),
    ("stop", dict(stop=["ok", ""])),
    ("stop_token_ids", dict(stop_token_ids=[3, -1])),
    ("logprobs", dict(logprobs=-1)),
    ("presence_penalty", dict(presence_penalty=2.5)),
    ("frequency_penalty", dict(frequency_penalty=-2.01)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("length_penalty", dict(length_penalty=0.5)),          # only for beam search
    ("early_stopping", dict(early_stopping=True)),         # only for beam search
    ("early_stopping", dict(BEAM, early_stopping="sometimes")),
    ("temperature", dict(BEAM, temperature=0.7)),
    ("top_p", dict(BEAM, top_p=0.9)),
    ("top_k", dict(BEAM, top_k=5)),
]


@pytest.mark.parametrize("field,kwargs", INVALID,
                         ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_field_raises_value_error_naming_it(field, kwargs):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)


def test_defaults_equal_vllms():
    # vLLM v0 SamplingParams() after __post_init__ (best_of becomes n, stop a list)
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (
        1, 1, 1.0, 1.0, -1, 0.0, None)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids, p.ignore_eos) == (
        16, 0, [], [], False)
    assert (p.logprobs, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (
        None, 0.0, 0.0, 1.0)
    assert (p.use_beam_search, p.length_penalty, p.early_stopping) == (False, 1.0, False)
    assert (p.skip_special_tokens, p.include_stop_str_in_output) == (True, False)
    assert p.sampling_type == SamplingType.RANDOM


@pytest.mark.parametrize("temperature", [0.0, 1e-6])
def test_temperature_zero_is_greedy_and_switches_truncation_off(temperature):
    p = SamplingParams(temperature=temperature, top_p=0.5, top_k=3, min_p=0.2)
    assert p.sampling_type == SamplingType.GREEDY and p.is_greedy
    assert (p.top_p, p.top_k, p.min_p) == (1.0, -1, 0.0)


def test_small_positive_temperature_is_not_greedy():
    assert SamplingParams(temperature=1e-3).sampling_type == SamplingType.RANDOM


def test_seed_makes_the_sampling_type_random_seed():
    assert SamplingParams(seed=7).sampling_type == SamplingType.RANDOM_SEED


def test_beam_search_sampling_type_and_width_is_best_of():
    p = SamplingParams(n=2, best_of=4, use_beam_search=True, temperature=0.0)
    assert p.sampling_type == SamplingType.BEAM
    assert p.beam_width == 4
    assert SamplingParams(n=3, use_beam_search=True, temperature=0.0).beam_width == 3


def test_best_of_defaults_to_n():
    assert SamplingParams(n=3).best_of == 3


def test_a_single_stop_string_becomes_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_max_tokens_none_means_until_the_context_is_full():
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None


def test_beam_search_accepts_length_penalty_and_early_stopping():
    p = SamplingParams(**BEAM, length_penalty=0.6, early_stopping="never")
    assert (p.length_penalty, p.early_stopping) == (0.6, "never")
