"""The core property of the whole system (DESIGN.md section 6, issue 5):

for random workloads — ragged prompts, random max_tokens, arrivals between steps — run
with a KV budget small enough to force preemptions (in each mode), with prefix-cache
hits, chunked prefills and forks, the greedy outputs are token for token those of
generating each prompt alone with no paging (Hugging Face transformers' generate on the
same weights, a plain contiguous cache), and afterwards every block is free.

The model is a tiny random LLaMA (GQA) saved with `save_pretrained` and loaded through
the engine's HF-directory loader. Its weights are scaled up so the logits are peaked:
an fp32 near-tie between the top two tokens could otherwise flip a greedy choice and
make the comparison flaky. Any mismatch is checked: it is only accepted if transformers'
own top-two logits at that point differ by less than TIE (and such ties are counted).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minipaged import LLM, SamplingParams
from tests.fixtures_models import save_tiny_llama
from tests.strategies import engine_workloads

VOCAB = 96
TIE = 1e-4          # logit gap below which fp32 rounding may decide the argmax


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    return path, save_tiny_llama(path, vocab_size=VOCAB)


class Reference:
    """Each prompt generated alone by transformers (contiguous cache), memoised."""

    def __init__(self, hf_model):
        self.model = hf_model
        self.cache: dict[tuple, list[int]] = {}

    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        key = tuple(prompt)
        have = self.cache.get(key, [])
        if len(have) < max_tokens:
            ids = torch.tensor([prompt])
            # an explicit mask: otherwise generate() would treat token 0 as padding
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                      do_sample=False, pad_token_id=0)
            have = out[0, len(prompt):].tolist()
            self.cache[key] = have
        return have[:max_tokens]

    @torch.inference_mode()
    def top2_gap(self, tokens: list[int]) -> float:
        logits = self.model(torch.tensor([tokens])).logits[0, -1]
        top = logits.topk(2).values
        return float(top[0] - top[1])


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return Reference(tiny_llama[1])


def assert_same_as_alone(reference: Reference, prompt: list[int], got: list[int],
                         max_tokens: int) -> int:
    """Token-for-token equality with the unpaged reference; returns 1 for a counted tie."""
    want = reference.greedy(prompt, max_tokens)
    if got == want:
        return 0
    k = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    gap = reference.top2_gap(prompt + want[:k])
    assert gap < TIE, f"diverged at output token {k}: {got} vs {want} (gap {gap:.2e})"
    return 1


def make_llm(path, **kwargs) -> LLM:
    defaults = dict(block_size=4, num_gpu_blocks=24, swap_space=1 << 20, seed=0,
                    attention_backend="torch", max_num_batched_tokens=24)
    defaults.update(kwargs)
    return LLM(model=str(path), **defaults)


def test_a_batch_matches_generating_each_prompt_alone(tiny_llama, reference):
    llm = make_llm(tiny_llama[0], num_gpu_blocks=64)
    prompts = [[1, 2, 3], list(range(10, 40)), [5] * 9, list(range(50, 57))]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)
    ties = sum(assert_same_as_alone(reference, p, o.outputs[0].token_ids, 12)
               for p, o in zip(prompts, outs))
    assert ties == 0
    assert llm.stats()["num_free_blocks"] == 64


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@settings(max_examples=12)
@given(workload=engine_workloads(vocab=VOCAB, max_prompt=30, max_tokens=20),
       num_blocks=st.integers(12, 30), fork=st.booleans())
def test_random_workloads_under_memory_pressure_match_unpaged_generation(
        tiny_llama, reference, mode, workload, num_blocks, fork):
    llm = make_llm(tiny_llama[0], num_gpu_blocks=num_blocks, preemption_mode=mode,
                   enable_prefix_caching=True)
    engine = llm.llm_engine
    pending, finished, step = list(workload), {}, 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0].arrival_step <= step:
            req = pending.pop(0)
            # n = 2 with top_k = 1 is greedy in each of two forked sequences: forks and
            # copy-on-write must not change a single token.
            params = (SamplingParams(n=2, temperature=1.0, top_k=1, max_tokens=req.max_tokens,
                                     ignore_eos=True) if fork else
                      SamplingParams(temperature=0, max_tokens=req.max_tokens, ignore_eos=True))
            engine.add_request(req.request_id, req.prompt, params)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        step += 1
        assert step < 2000, "the engine stopped making progress"
    ties = 0
    for req in workload:
        out = finished[req.request_id]
        for completion in out.outputs:
            if completion.finish_reason == "length" and len(completion.token_ids) < req.max_tokens:
                continue     # ended early: the request outgrew the whole (tiny) pool
            ties += assert_same_as_alone(reference, req.prompt, completion.token_ids,
                                         req.max_tokens)
    assert ties <= 1
    stats = llm.stats()
    assert stats["num_free_blocks"] == num_blocks
    assert stats["num_free_cpu_blocks"] == stats["num_cpu_blocks"]


def test_memory_pressure_really_preempts_in_both_modes(tiny_llama, reference):
    for mode in ("recompute", "swap"):
        llm = make_llm(tiny_llama[0], num_gpu_blocks=12, preemption_mode=mode, watermark=0.0)
        prompts = [list(range(i, i + 10)) for i in range(4)]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16,
                                                    ignore_eos=True), use_tqdm=False)
        stats = llm.stats()
        assert stats["num_preemptions"] > 0
        assert (stats["num_swap_preemptions"] > 0) == (mode == "swap")
        for p, o in zip(prompts, outs):
            assert assert_same_as_alone(reference, p, o.outputs[0].token_ids, 16) == 0
        assert stats["num_free_blocks"] == 12


@pytest.mark.parametrize("width,length_penalty", [(2, 1.0), (4, 0.5)])
def test_beam_search_through_the_paged_engine_equals_a_plain_reference_beam_search(
        tiny_llama, width, length_penalty):
    from tests.test_beam_search import reference_beam_search

    hf_model = tiny_llama[1]

    @torch.inference_mode()
    def logprobs(tokens: list[int]):      # no paging, no cache: the whole prefix each time
        logits = hf_model(torch.tensor([tokens])).logits[0, -1].double()
        return torch.log_softmax(logits, -1).numpy()

    prompt, max_tokens = [3, 14, 15, 92, 65], 6
    want = reference_beam_search(logprobs, prompt, width, length_penalty, max_tokens, eos=-1)
    # a small pool: the beams fork, share and copy-on-write their blocks as they go
    llm = make_llm(tiny_llama[0], num_gpu_blocks=16)
    out = llm.generate([prompt], SamplingParams(n=width, use_beam_search=True, temperature=0,
                                                length_penalty=length_penalty,
                                                max_tokens=max_tokens), use_tqdm=False)[0]
    got = [(c.token_ids, c.cumulative_logprob) for c in out.outputs]
    assert [tokens for tokens, _ in got] == [tokens for tokens, _, _ in want]
    for (_, cum), (_, ref_cum, _) in zip(got, want):
        assert cum == pytest.approx(ref_cum, abs=1e-4)   # fp32 engine vs fp64 reference
    assert llm.stats()["num_free_blocks"] == 16
