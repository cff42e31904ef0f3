"""The asynchronous engine loop: requests come and go between steps, streams end cleanly.

Driven with the stub model (logits make token (last + 1) % vocab the greedy choice) and
a one-character-per-token fake tokenizer, so the engine's real stop-string logic runs
without weights: every test here takes milliseconds.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipaged.config import EngineConfig
from minipaged.engine import LLMEngine
from minipaged.entrypoints.async_engine import AsyncLLMEngine, EngineStepError
from minipaged.entrypoints.request_stream import DeltaTracker
from minipaged.model_executor.executor import StubExecutor
from minipaged.sampling import SamplingParams

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?-ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:64]


class CharTokenizer:
    """Token i is the character CHARS[i]: decode is exact, so text = tokens, one to one."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(CHARS[i] for i in ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [CHARS.index(c) for c in text]


def make_engine(num_blocks: int = 64, block_size: int = 4, max_model_len: int = 256,
                executor_cls=StubExecutor, tokenizer=None) -> LLMEngine:
    config = EngineConfig(model="stub", block_size=block_size, num_gpu_blocks=num_blocks)
    executor = executor_cls(num_blocks, 0, vocab_size=len(CHARS), max_model_len=max_model_len)
    executor.tokenizer = tokenizer
    return LLMEngine(config, executor)


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def stub_continuation(prompt: list[int], n: int) -> list[int]:
    """What the stub model generates greedily: each token is the previous one plus one."""
    return [(prompt[-1] + i) % len(CHARS) for i in range(1, n + 1)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


async def drain(stream) -> list:
    return [out async for out in stream]


async def wait_idle(engine: AsyncLLMEngine) -> None:
    """Until the loop has applied everything queued and the engine has no work."""
    for _ in range(1000):
        if not engine._pending_aborts and not engine.engine.has_unfinished_requests():
            await asyncio.sleep(0.01)           # one more turn: the loop takes its snapshot
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the engine never became idle")


def test_concurrent_requests_each_get_the_model_continuation_of_their_own_prompt():
    async def main():
        engine = AsyncLLMEngine(make_engine())
        engine.start()
        prompts = [[i, i + 1, i + 2] for i in range(0, 40, 5)]
        streams = await asyncio.gather(*(engine.add_request(None, greedy(6), f"r{i}",
                                                            prompt_token_ids=p)
                                         for i, p in enumerate(prompts)))
        outputs = await asyncio.gather(*(drain(s) for s in streams))
        await engine.shutdown()
        return engine, prompts, outputs

    engine, prompts, outputs = run(main())
    for prompt, outs in zip(prompts, outputs):
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        assert outs[-1].outputs[0].token_ids == stub_continuation(prompt, 6)
    # continuous batching: the 8 requests shared steps instead of running one after another
    assert engine.stats()["num_steps"] < 8 * 6


def test_every_output_of_a_stream_extends_the_previous_one():
    async def main():
        engine = AsyncLLMEngine(make_engine())
        engine.start()
        outs = await drain(await engine.add_request(None, greedy(5), prompt_token_ids=[1, 2]))
        await engine.shutdown()
        return outs

    lengths = [len(o.outputs[0].token_ids) for o in run(main())]
    assert lengths == sorted(lengths) and lengths[-1] == 5


def test_leaving_a_stream_early_aborts_the_request_and_frees_its_blocks():
    async def main():
        engine = AsyncLLMEngine(make_engine(num_blocks=64, block_size=4))
        engine.start()
        stream = await engine.add_request(None, greedy(200), "long", prompt_token_ids=[1, 2, 3])
        seen = 0
        async for out in stream:
            seen = len(out.outputs[0].token_ids)
            if seen >= 3:
                break
        await wait_idle(engine)
        stats = engine.stats()
        await engine.shutdown()
        return seen, stats

    seen, stats = run(main())
    assert seen == 3
    assert stats["num_free_blocks"] == stats["num_gpu_blocks"]
    assert stats["num_aborted_requests"] == 1
    assert stats["num_generated_tokens"] < 200


def test_cancelling_the_consumer_task_aborts_its_request():
    async def main():
        engine = AsyncLLMEngine(make_engine())
        engine.start()
        started = asyncio.Event()

        async def consume():
            async for _ in await engine.add_request(None, greedy(500), "c",
                                                    prompt_token_ids=[5]):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_idle(engine)
        stats = engine.stats()
        await engine.shutdown()
        return stats

    stats = run(main())
    assert stats["num_aborted_requests"] == 1
    assert stats["num_free_blocks"] == stats["num_gpu_blocks"]


def test_a_rejected_request_raises_value_error_and_the_loop_keeps_serving():
    async def main():
        engine = AsyncLLMEngine(make_engine(max_model_len=16))
        engine.start()
        with pytest.raises(ValueError, match="max_model_len"):
            await engine.add_request(None, greedy(4), prompt_token_ids=list(range(20)))
        with pytest.raises(ValueError, match="already in use"):
            s = await engine.add_request(None, greedy(4), "same", prompt_token_ids=[1])
            await engine.add_request(None, greedy(4), "same", prompt_token_ids=[1])
        ok = await drain(s)
        await engine.shutdown()
        return ok

    assert run(main())[-1].outputs[0].token_ids == stub_continuation([1], 4)


class FailOnceExecutor(StubExecutor):
    """A stub whose forward raises the first time it sees token 63 in a batch."""

    failed = False

    def execute(self, items, swap_in, swap_out, copies):
        if not FailOnceExecutor.failed and any(63 in it.token_ids for it in items):
            FailOnceExecutor.failed = True
            raise RuntimeError("injected failure")
        return super().execute(items, swap_in, swap_out, copies)


def test_a_failing_step_fails_its_requests_and_the_loop_serves_on():
    async def main():
        FailOnceExecutor.failed = False
        engine = AsyncLLMEngine(make_engine(executor_cls=FailOnceExecutor))
        engine.start()
        bad = await engine.add_request(None, greedy(4), "bad", prompt_token_ids=[63])
        with pytest.raises(EngineStepError, match="injected failure"):
            await drain(bad)
        await wait_idle(engine)
        free_after_failure = engine.stats()["num_free_blocks"]
        good = await drain(await engine.add_request(None, greedy(3), "good",
                                                    prompt_token_ids=[7]))
        await engine.shutdown()
        return engine, free_after_failure, good

    engine, free_after_failure, good = run(main())
    assert engine.num_step_errors == 1
    assert free_after_failure == engine.stats()["num_gpu_blocks"]
    assert good[-1].outputs[0].token_ids == stub_continuation([7], 3)


class GuardedEngine(LLMEngine):
    """Records whether add / abort ever ran while step() was running in another thread."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_step = threading.Event()
        self.overlaps = 0

    def step(self):
        self.in_step.set()
        try:
            threading.Event().wait(0.002)      # widen the window a racing call would hit
            return super().step()
        finally:
            self.in_step.clear()

    def add_request(self, *args, **kwargs):
        self.overlaps += self.in_step.is_set()
        return super().add_request(*args, **kwargs)

    def abort_request(self, *args, **kwargs):
        self.overlaps += self.in_step.is_set()
        return super().abort_request(*args, **kwargs)


def test_requests_are_added_and_aborted_only_between_steps():
    async def main():
        config = EngineConfig(model="stub", block_size=4, num_gpu_blocks=256)
        engine = AsyncLLMEngine(GuardedEngine(config, StubExecutor(256, 0, vocab_size=64)))
        engine.start()

        async def one(i: int):
            stream = await engine.add_request(None, greedy(8), f"r{i}", prompt_token_ids=[i])
            async for out in stream:
                if i % 3 == 0 and len(out.outputs[0].token_ids) >= 2:
                    break                       # every third client leaves early
                await asyncio.sleep(0)

        async def staggered(i: int):
            await asyncio.sleep(0.003 * i)
            await one(i)

        await asyncio.gather(*(staggered(i) for i in range(24)))
        await wait_idle(engine)
        await engine.shutdown()
        return engine

    engine = run(main())
    assert engine.engine.overlaps == 0
    assert engine.num_aborted == 8
    assert engine.stats()["num_free_blocks"] == 256


# ---- streaming deltas --------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(start=st.integers(0, 63), stop_offset=st.integers(1, 12), stop_len=st.integers(1, 4),
       max_tokens=st.integers(1, 16), include=st.booleans())
def test_streamed_deltas_concatenate_to_the_final_text_even_when_a_stop_string_is_trimmed(
        start, stop_offset, stop_len, max_tokens, include):
    # the stub generates consecutive characters, so a stop string cut from them matches
    stop = "".join(CHARS[(start + stop_offset + k) % 64] for k in range(stop_len))
    params = greedy(max_tokens, stop=[stop], include_stop_str_in_output=include)

    async def main():
        engine = AsyncLLMEngine(make_engine(tokenizer=CharTokenizer()))
        engine.start()
        stream = await engine.add_request(None, params, prompt_token_ids=[start])
        deltas, sent, final = DeltaTracker(params), [], None
        async for out in stream:
            text, _, _ = deltas.advance(0, out.outputs[0])
            if text:
                sent.append(text)
                # nothing sent may ever be taken back by the final text
                assert out.outputs[0].text.startswith("".join(sent)) or out.finished
            final = out
        await engine.shutdown()
        return sent, final

    sent, final = run(main())
    assert "".join(sent) == final.outputs[0].text
    if final.outputs[0].finish_reason == "stop":
        assert final.outputs[0].text.endswith(stop) == include


def test_a_choice_that_has_finished_sends_nothing_more():
    from minipaged.outputs import CompletionOutput

    tracker = DeltaTracker(greedy(4))
    done = CompletionOutput(0, "ab", [0, 1], None, None, finish_reason="length")
    assert tracker.advance(0, done)[0] == "ab"
    assert tracker.advance(0, done) == (None, [], False)


def test_from_factory_builds_the_engine_on_the_thread_that_runs_its_steps():
    # one thread for all the model's torch work: see AsyncLLMEngine.from_factory
    threads = {"build": None, "steps": set()}

    def make() -> LLMEngine:
        threads["build"] = threading.get_ident()
        engine = make_engine()
        step = engine.step

        def recorded_step(*args, **kwargs):
            threads["steps"].add(threading.get_ident())
            return step(*args, **kwargs)

        engine.step = recorded_step
        return engine

    async def main():
        engine = AsyncLLMEngine.from_factory(make)
        engine.start()
        await drain(await engine.add_request(None, greedy(4), prompt_token_ids=[1, 2]))
        await engine.shutdown()

    run(main())
    assert threads["build"] != threading.get_ident()          # not the caller's thread
    assert threads["steps"] == {threads["build"]}


def test_from_factory_raises_what_the_factory_raised():
    def make() -> LLMEngine:
        raise ValueError("model: no such file")

    with pytest.raises(ValueError, match="model: no such file"):
        AsyncLLMEngine.from_factory(make)
