"""The engine's memory bookkeeping, driven with a stub model (no weights, no tensors).

The stub's logits make token (last + 1) % vocab the greedy choice, so outputs are
predictable and these tests isolate the scheduler + block manager + sampler plumbing:
sharing, copy-on-write, preemption, swapping, aborts and the "all blocks free" promise.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipaged.config import EngineConfig
from minipaged.engine import LLMEngine
from minipaged.model_executor.executor import StubExecutor
from minipaged.sampling import SamplingParams
from tests.strategies import engine_workloads

VOCAB = 64


def make_engine(num_blocks: int = 64, block_size: int = 16, num_cpu_blocks: int = 64,
                **kwargs) -> LLMEngine:
    config = EngineConfig(model="stub", block_size=block_size, num_gpu_blocks=num_blocks,
                          **kwargs)
    executor = StubExecutor(num_blocks, num_cpu_blocks, vocab_size=VOCAB, max_model_len=512)
    return LLMEngine(config, executor)


def run_to_end(engine: LLMEngine, max_steps: int = 10_000) -> dict:
    finished = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return finished
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    raise AssertionError("the engine did not finish its requests")


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def test_greedy_output_follows_the_stub_model():
    engine = make_engine()
    engine.add_request("a", [3, 4, 5], greedy(4))
    out = run_to_end(engine)["a"]
    assert out.outputs[0].token_ids == [6, 7, 8, 9]
    assert out.outputs[0].finish_reason == "length"


def test_parallel_sampling_holds_the_prompt_blocks_once():
    engine = make_engine(block_size=16)
    prompt = list(range(64))                       # exactly 4 full blocks
    engine.add_request("a", prompt, SamplingParams(n=4, temperature=1.0, seed=0,
                                                   max_tokens=8, ignore_eos=True))
    engine.step()                                  # prefill, sample 4 tokens, fork 3 children
    engine.step()                                  # every sequence writes its first token
    bm = engine.block_manager
    seqs = engine._groups["a"].get_unfinished_seqs()
    assert len(seqs) == 4
    tables = [bm.get_block_table(s.seq_id) for s in seqs]
    assert all(t[:4] == tables[0][:4] for t in tables)          # prompt blocks shared
    assert len({t[4] for t in tables}) == 4                     # one own block each
    assert bm.num_blocks - bm.num_free_blocks == 4 + 4          # held once, not 4 times
    assert engine.stats()["num_cow_copies"] == 0                # nothing shared was written


def test_copy_on_write_happens_only_when_a_shared_partial_block_is_written():
    engine = make_engine(block_size=16)
    prompt = list(range(60))                       # last block shared and partly filled
    engine.add_request("a", prompt, SamplingParams(n=4, temperature=1.0, seed=0,
                                                   max_tokens=8, ignore_eos=True))
    engine.step()
    assert engine.stats()["num_cow_copies"] == 0   # forking copies nothing
    engine.step()
    # three of the four sequences copy the shared last block; the last writer keeps it
    assert engine.stats()["num_cow_copies"] == 3
    run_to_end(engine)
    assert engine.stats()["num_cow_copies"] == 3   # later tokens land in private blocks


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_memory_pressure_preempts_and_every_request_still_finishes(mode):
    engine = make_engine(num_blocks=12, block_size=4, preemption_mode=mode, watermark=0.0)
    for i in range(6):
        engine.add_request(str(i), list(range(i, i + 10)), greedy(20))
    finished = run_to_end(engine)
    stats = engine.stats()
    assert len(finished) == 6
    assert stats["num_preemptions"] > 0
    if mode == "swap":
        assert stats["num_swap_preemptions"] > 0
        assert stats["num_swapped_out_blocks"] == stats["num_swapped_in_blocks"] > 0
    else:
        assert stats["num_recompute_preemptions"] == stats["num_preemptions"]
    assert stats["num_free_blocks"] == 12
    for i in range(6):     # preemption never changes what a request generates
        assert finished[str(i)].outputs[0].token_ids == [(i + 10 + k) % VOCAB
                                                         for k in range(20)]


def test_groups_with_several_sequences_are_swapped_not_recomputed():
    engine = make_engine(num_blocks=14, block_size=4, preemption_mode="recompute",
                         watermark=0.0)
    engine.add_request("old", list(range(24)), greedy(24))
    engine.add_request("par", list(range(40, 48)), SamplingParams(n=3, seed=1, max_tokens=8,
                                                             ignore_eos=True))
    finished = run_to_end(engine)
    assert len(finished["par"].outputs) == 3
    stats = engine.stats()
    assert stats["num_swap_preemptions"] >= 1
    assert stats["num_free_blocks"] == 14 and stats["num_free_cpu_blocks"] == 64


def test_a_request_that_outgrows_the_whole_pool_ends_with_length():
    engine = make_engine(num_blocks=4, block_size=4, watermark=0.0)
    engine.add_request("a", [1, 2, 3], greedy(100))
    out = run_to_end(engine)["a"]
    assert out.outputs[0].finish_reason == "length"
    # 16 slots hold K/V; the 17th token was sampled from them and is never fed back
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 16 + 1
    assert engine.block_manager.num_free_blocks == 4


def test_never_more_than_max_num_seqs_sequences_run_at_once():
    engine = make_engine(max_num_seqs=3)
    engine.add_request("par", [1, 2], SamplingParams(n=2, seed=0, max_tokens=6,
                                                     ignore_eos=True))
    for i in range(4):
        engine.add_request(str(i), [i + 3], greedy(6))
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        running = sum(len(g.get_unfinished_seqs()) for g in engine.scheduler.running)
        peak = max(peak, running)
        assert running <= 3
    assert peak == 3
    with pytest.raises(ValueError, match="best_of"):
        engine.add_request("wide", [1], SamplingParams(n=4, seed=0))


def test_an_aborted_request_frees_its_blocks():
    engine = make_engine()
    engine.add_request("a", list(range(40)), greedy(100))
    engine.add_request("b", list(range(20)), greedy(100))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < 64
    engine.abort_request(["a", "b"])
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == 64


def test_a_prompt_longer_than_the_context_is_rejected():
    engine = make_engine()
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("a", [1] * 600, greedy(4))
    engine.add_request("b", [1, 2], greedy(2))      # the engine keeps serving
    assert run_to_end(engine)["b"].outputs[0].token_ids == [3, 4]


def test_a_token_id_outside_the_vocabulary_is_rejected_and_the_engine_keeps_serving():
    engine = make_engine()
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("bad", [1, 2, VOCAB], greedy(4))
    engine.add_request("ok", [1, 2], greedy(2))
    assert run_to_end(engine)["ok"].outputs[0].token_ids == [3, 4]


def test_a_prompt_needing_more_blocks_than_the_cache_has_is_rejected():
    engine = make_engine(num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="num_gpu_blocks"):
        engine.add_request("a", list(range(30)), greedy(4))


def test_a_prefix_cache_hit_skips_the_shared_blocks():
    engine = make_engine(block_size=4, enable_prefix_caching=True)
    shared = list(range(20))
    engine.add_request("a", shared + [40, 41], greedy(3))
    run_to_end(engine)
    engine.add_request("b", shared + [50], greedy(3))
    finished = run_to_end(engine)
    assert finished["b"].num_cached_tokens == 20
    stats = engine.stats()
    assert stats["prefix_cache_hits"] == 5 and stats["prefix_cache_hit_rate"] > 0
    assert finished["b"].outputs[0].token_ids == [51, 52, 53]


def test_requests_admitted_in_the_same_step_share_their_common_prefix():
    engine = make_engine(block_size=4, enable_prefix_caching=True)
    shared = list(range(20))
    engine.add_request("a", shared + [40, 41], greedy(3))
    engine.add_request("b", shared + [50], greedy(3))
    engine.step()                                  # both prompts run in this one step
    assert engine.scheduler.running[1].num_cached_tokens == 20
    finished = run_to_end(engine)
    assert finished["b"].outputs[0].token_ids == [51, 52, 53]


def test_step_can_report_only_finished_requests():
    engine = make_engine()
    engine.add_request("short", [1], greedy(1))
    engine.add_request("long", [1], greedy(5))
    first = engine.step(finished_only=True)
    assert [o.request_id for o in first] == ["short"] and first[0].finished
    streamed = engine.step()                       # the default streams every request touched
    assert [o.request_id for o in streamed] == ["long"] and not streamed[0].finished


def test_stats_report_the_pool_and_the_counters():
    engine = make_engine()
    stats = engine.stats()
    for key in ("num_gpu_blocks", "num_free_blocks", "kv_cache_usage", "prefix_cache_hit_rate",
                "num_preemptions", "num_swapped_out_blocks", "num_cow_copies"):
        assert key in stats
    assert stats["num_free_blocks"] == stats["num_gpu_blocks"] == 64


@settings(max_examples=40)
@given(workload=engine_workloads(), mode=st.sampled_from(["recompute", "swap"]),
       num_blocks=st.integers(6, 40), prefix=st.booleans())
def test_random_workloads_finish_with_every_block_free(workload, mode, num_blocks, prefix):
    engine = make_engine(num_blocks=num_blocks, block_size=4, num_cpu_blocks=64,
                         preemption_mode=mode, enable_prefix_caching=prefix,
                         max_num_batched_tokens=32)
    pending = list(workload)
    finished: dict = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0].arrival_step <= step:
            req = pending.pop(0)
            if -(-len(req.prompt) // 4) > num_blocks:
                continue
            engine.add_request(req.request_id, req.prompt, greedy(req.max_tokens, n=1))
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        step += 1
        assert step < 5000
    for rid, out in finished.items():
        prompt = out.prompt_token_ids
        expected = [(prompt[-1] + 1 + k) % VOCAB for k in range(len(out.outputs[0].token_ids))]
        assert out.outputs[0].token_ids == expected
    assert engine.block_manager.num_free_blocks == num_blocks
    assert engine.block_manager.num_free_host_blocks == 64
