"""Prompt logprobs (SamplingParams.prompt_logprobs, RequestOutput.prompt_logprobs).

With the stub model every logit row is 5.0 at (its token + 1) % vocab and 0 elsewhere,
so the expected values are known in closed form: a prompt token that follows its
predecessor (t = prev + 1) has logprob 5 - LSE, any other -LSE, LSE = log(e^5 + V - 1).
The tiny random LLaMA checks the values against transformers' own log-softmax.
"""

from __future__ import annotations

import math

import pytest
import torch

from minipaged import LLM, SamplingParams
from minipaged.sampling import SamplingParams as Params
from tests.fixtures_models import save_tiny_llama
from tests.test_engine_bookkeeping import VOCAB, greedy, make_engine, run_to_end

LSE = math.log(math.exp(5.0) + VOCAB - 1)


def expected(prompt: list[int]) -> list:
    """The stub model's prompt logprobs of `prompt`, target token only."""
    return [None] + [{t: (5.0 if t == (p + 1) % VOCAB else 0.0) - LSE}
                     for p, t in zip(prompt, prompt[1:])]


def assert_same(got: list, want: list, tol: float = 1e-5) -> None:
    assert len(got) == len(want)
    assert got[0] is None and want[0] is None
    for g, w in zip(got[1:], want[1:]):
        assert g.keys() == w.keys()
        assert all(abs(g[k] - w[k]) <= tol for k in w)   # fp32 log-softmax: 1e-5


PROMPT = [3, 4, 5, 9, 10, 2, 3, 40, 41, 42, 7]


def test_each_prompt_token_gets_its_logprob_given_the_tokens_before_it():
    engine = make_engine(block_size=4)
    engine.add_request("a", PROMPT, greedy(3, prompt_logprobs=0))
    out = run_to_end(engine)["a"]
    assert_same(out.prompt_logprobs, expected(PROMPT))
    assert out.outputs[0].token_ids == [8, 9, 10]      # sampling is unchanged


def test_prompt_logprobs_k_adds_the_k_most_likely_tokens():
    engine = make_engine(block_size=4)
    engine.add_request("a", PROMPT, greedy(1, prompt_logprobs=1))
    out = run_to_end(engine)["a"]
    for prev, tok, entry in zip(PROMPT, PROMPT[1:], out.prompt_logprobs[1:]):
        top = (prev + 1) % VOCAB
        assert set(entry) == {top, tok}                 # one entry when they coincide
        assert abs(entry[top] - (5.0 - LSE)) <= 1e-5


def test_a_request_without_prompt_logprobs_gets_none():
    engine = make_engine(block_size=4)
    engine.add_request("a", PROMPT, greedy(2))
    assert run_to_end(engine)["a"].prompt_logprobs is None


def test_a_one_token_prompt_has_only_the_leading_none():
    engine = make_engine(block_size=4)
    engine.add_request("a", [7], greedy(2, prompt_logprobs=2))
    assert run_to_end(engine)["a"].prompt_logprobs == [None]


def test_a_chunked_prefill_gives_every_chunk_its_rows():
    prompt = list(range(5, 45)) + [1, 2, 3]
    engine = make_engine(block_size=4, enable_chunked_prefill=True, max_num_batched_tokens=8)
    engine.add_request("a", prompt, greedy(2, prompt_logprobs=0))
    engine.add_request("b", [11, 12, 13, 30], greedy(2))
    finished = run_to_end(engine)
    assert engine.stats()["num_steps"] > len(prompt) // 8      # it did run in chunks
    assert_same(finished["a"].prompt_logprobs, expected(prompt))


def test_a_request_with_prompt_logprobs_neither_hits_nor_fills_the_prefix_cache():
    engine = make_engine(block_size=4, enable_prefix_caching=True)
    shared = list(range(20))
    engine.add_request("a", shared + [40, 41], greedy(3))
    run_to_end(engine)
    engine.add_request("b", shared + [50], greedy(3, prompt_logprobs=0))
    b = run_to_end(engine)["b"]
    assert b.num_cached_tokens == 0                      # every position was computed
    assert_same(b.prompt_logprobs, expected(shared + [50]))
    assert engine.stats()["prefix_cache_hits"] == 0
    engine.add_request("c", list(range(30, 51)), greedy(1, prompt_logprobs=0))
    run_to_end(engine)
    engine.add_request("d", list(range(30, 51)), greedy(1))
    assert run_to_end(engine)["d"].num_cached_tokens == 0   # "c" left nothing cached
    assert engine.stats()["num_free_blocks"] == engine.block_manager.num_blocks


def test_a_recomputed_prompt_adds_no_second_entry():
    engine = make_engine(num_blocks=12, block_size=4, preemption_mode="recompute",
                         watermark=0.0)
    prompts = [list(range(i, i + 10)) for i in range(6)]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy(20, prompt_logprobs=0))
    finished = run_to_end(engine)
    assert engine.stats()["num_recompute_preemptions"] > 0
    for i, p in enumerate(prompts):
        assert_same(finished[str(i)].prompt_logprobs, expected(p))
    assert engine.stats()["num_free_blocks"] == 12


def test_parallel_samples_share_one_list_of_prompt_logprobs():
    engine = make_engine(block_size=4)
    engine.add_request("a", PROMPT, SamplingParams(n=3, seed=0, max_tokens=4,
                                                   ignore_eos=True, prompt_logprobs=0))
    out = run_to_end(engine)["a"]
    assert len(out.outputs) == 3
    assert_same(out.prompt_logprobs, expected(PROMPT))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_prompt_logprobs_must_be_a_non_negative_integer(bad):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        Params(prompt_logprobs=bad)


# -- against transformers, on a tiny random LLaMA -----------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_plp")
    model = save_tiny_llama(path, vocab_size=96)  # peaked logits: no near-ties in a top 3
    return path, model


@pytest.mark.parametrize("chunked", [False, True])
def test_prompt_logprobs_match_transformers_log_softmax(tiny, chunked):
    path, hf = tiny
    prompt = torch.randint(0, 96, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    args = dict(enable_chunked_prefill=True, max_num_batched_tokens=16) if chunked else {}
    llm = LLM(model=str(path), block_size=8, seed=0, **args)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2,
                                                prompt_logprobs=3), use_tqdm=False)[0]
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].double(), dim=-1)
    got = out.prompt_logprobs
    assert len(got) == len(prompt) and got[0] is None
    for i in range(1, len(prompt)):
        top3 = ref[i - 1].topk(3).indices.tolist()
        assert set(got[i]) == set(top3) | {prompt[i]}
        for tok, lp in got[i].items():
            assert abs(lp - float(ref[i - 1, tok])) <= 1e-4   # fp32 forward vs fp64 softmax
    bm = llm.llm_engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
