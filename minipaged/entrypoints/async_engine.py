"""AsyncLLMEngine: the serving loop of the paper's Fig. 4 behind an asyncio front door.

An HTTP server receives requests at any moment, but `LLMEngine` is a plain, single-threaded
object: one `step()` schedules a batch, runs the model and samples one token for each
running sequence (iteration-level scheduling, section 4.2 / Orca). This module lets the
two meet:

    event loop thread                         step thread (one worker)
    -----------------                         ------------------------
    add_request()  -> queued ---+
    abort()        -> queued ---+--> applied between steps
    background task: apply queue, await step() in the worker ----> engine.step()
                     hand each RequestOutput to its RequestStream <----

`DeltaTracker` turns a stream's growing outputs into the pieces a streaming client is
sent: only the new text of each choice, holding back what might still be trimmed as
the start of a stop string.

Invariant: the engine is only ever touched by one thread at a time — requests are added
and aborted by the loop task *between* steps, never while `step()` runs in the worker —
and no request, however bad, stops the loop: a rejected request fails its own stream,
and a step that raises fails the requests it was running, after which the loop serves on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

from minipaged.engine import LLMEngine
from minipaged.outputs import CompletionOutput, RequestOutput
from minipaged.sampling import SamplingParams

logger = logging.getLogger(__name__)

OutputListener = Callable[[list[RequestOutput], float], None]
AbortListener = Callable[[list[str]], None]


class EngineStepError(RuntimeError):
    """The engine raised inside step(); the requests it was running are failed."""


class RequestStream:
    """The outputs of one request, as an async iterator that ends after the final one.

    Leaving the `async for` early (a client that disconnected, a cancelled task) aborts
    the request, so its blocks go back to the pool at the next step boundary.
    """

    def __init__(self, request_id: str, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.finished = False
        self._abort = abort
        self._queue: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()

    # producer side (the loop task) --------------------------------------------------
    def put(self, item: RequestOutput | BaseException | None) -> None:
        """An output, an exception to raise in the consumer, or None (ended: aborted)."""
        self._queue.put_nowait(item)

    # consumer side --------------------------------------------------------------------
    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    self.finished = True
                    return
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                if item.finished:
                    self.finished = True
                yield item
                if self.finished:
                    return
        finally:
            if not self.finished:
                self.finished = True
                self._abort(self.request_id)


def _step_thread() -> ThreadPoolExecutor:
    """The one worker thread an AsyncLLMEngine runs its steps on (never in the event loop,
    which must stay free to accept requests and stream tokens)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="minipaged-step")


class AsyncLLMEngine:
    """Runs `engine.step()` in a worker thread while requests come and go.

    Use from inside a running event loop: `start()`, then `await add_request(...)` for a
    `RequestStream`, `abort(request_id)`, and `await shutdown()` at the end.
    `stats()` is a snapshot of `engine.stats()` taken between steps (safe to read any
    time). Output listeners (e.g. the Prometheus metrics) are called on the loop thread
    after every step with (outputs, time.monotonic()); abort listeners with the ids of
    live requests whose abort was applied.
    """

    def __init__(self, engine: LLMEngine, worker: ThreadPoolExecutor | None = None) -> None:
        """worker: the one-thread pool that runs the steps (the one `from_factory` built the
        engine on); a new one by default."""
        self.engine = engine
        self.output_listeners: list[OutputListener] = []
        self.abort_listeners: list[AbortListener] = []
        self._streams: dict[str, RequestStream] = {}
        self._pending_adds: list[tuple[asyncio.Future, str, dict]] = []
        self._pending_aborts: set[str] = set()
        self._worker = worker or _step_thread()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._stats: dict = {}
        self.num_step_errors = 0
        self.num_aborted = 0
        self._take_snapshot()

    @classmethod
    def from_config(cls, config) -> "AsyncLLMEngine":
        return cls.from_factory(lambda: LLMEngine.from_config(config))

    @classmethod
    def from_factory(cls, make: Callable[[], LLMEngine]) -> "AsyncLLMEngine":
        """An AsyncLLMEngine whose engine `make()` builds on the thread that will run its
        steps, so that the model's torch work all happens on one thread.

        Why it matters: OpenMP gives every thread that starts parallel work its own pool
        of helper threads. If the main thread loads the model (one pool) and a worker then
        runs the steps (a second pool), the process has more OpenMP threads than cores,
        and libgomp then stops spinning between parallel regions: each of the hundreds of
        small parallel regions of a step waits for its helpers to wake up. Measured on 2
        cores, one SmolLM2 request decoded at 30 ms/token that way, 19 when the model was
        loaded on the stepping thread.
        """
        worker = _step_thread()
        try:
            engine = worker.submit(make).result()
        except BaseException:
            worker.shutdown(wait=False)
            raise
        return cls(engine, worker)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # ---- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        """Start the background loop on the running event loop (idempotent)."""
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run_loop(),
                                                               name="minipaged-engine")

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def shutdown(self) -> None:
        """Stop the loop; every open stream ends (an in-flight step finishes in its thread)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for fut, _, _ in self._pending_adds:
            if not fut.done():
                fut.set_exception(RuntimeError("the engine is shutting down"))
        self._pending_adds.clear()
        for stream in self._streams.values():
            stream.put(None)
        self._streams.clear()
        self._worker.shutdown(wait=False)

    # ---- requests ----------------------------------------------------------------------
    async def add_request(self, prompt: str | list[int] | None, params: SamplingParams,
                          request_id: str | None = None, *,
                          prompt_token_ids: list[int] | None = None,
                          arrival_time: float | None = None) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it.

        Raises ValueError (the engine's message, naming the argument) if the engine
        rejects the request; nothing is left behind in that case.
        """
        if not self.is_running:
            raise RuntimeError("the engine loop is not running (call start() first)")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        kwargs = dict(prompt=prompt, params=params, prompt_token_ids=prompt_token_ids,
                      arrival_time=time.monotonic() if arrival_time is None else arrival_time)
        fut = asyncio.get_running_loop().create_future()
        self._pending_adds.append((fut, request_id, kwargs))
        self._wakeup.set()
        try:
            return await fut
        except asyncio.CancelledError:
            # the caller went away before the engine took the request: take it back out
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.abort(request_id)
            raise

    async def generate(self, prompt: str | list[int] | None, params: SamplingParams,
                       request_id: str | None = None, *,
                       prompt_token_ids: list[int] | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Convenience: add the request and yield its outputs (aborted if left early)."""
        stream = await self.add_request(prompt, params, request_id,
                                        prompt_token_ids=prompt_token_ids)
        async for out in stream:
            yield out

    def abort(self, request_id: str) -> None:
        """Abort a request at the next step boundary (no-op if it already finished).

        Must be called on the event loop's thread (streams call it for you).
        """
        stream = self._streams.pop(request_id, None)
        if stream is None:
            # maybe still queued for adding: drop it there
            for i, (fut, rid, _) in enumerate(self._pending_adds):
                if rid == request_id:
                    del self._pending_adds[i]
                    if not fut.done():
                        fut.cancel()
                    return
            return
        stream.put(None)
        self._pending_aborts.add(request_id)
        if self._wakeup is not None:
            self._wakeup.set()

    def stats(self) -> dict:
        """`engine.stats()` as of the last step boundary, plus the loop's own counters."""
        return dict(self._stats)

    def _take_snapshot(self) -> None:
        self._stats = {**self.engine.stats(), "num_aborted_requests": self.num_aborted,
                       "num_step_errors": self.num_step_errors}

    # ---- the loop ----------------------------------------------------------------------
    def _apply_pending(self) -> None:
        """Apply queued aborts and adds; only ever runs while no step is in flight."""
        if self._pending_aborts:
            ids, self._pending_aborts = sorted(self._pending_aborts), set()
            try:
                self.engine.abort_request(ids)
            except Exception:  # noqa: BLE001 - an abort must never stop the loop
                logger.exception("aborting %s failed", ids)
            self.num_aborted += len(ids)
            self._notify(self.abort_listeners, ids)
        adds, self._pending_adds = self._pending_adds, []
        for fut, request_id, kwargs in adds:
            if fut.done():             # the caller was cancelled meanwhile
                continue
            try:
                self.engine.add_request(request_id, kwargs["prompt"], kwargs["params"],
                                        prompt_token_ids=kwargs["prompt_token_ids"],
                                        arrival_time=kwargs["arrival_time"])
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                fut.set_exception(e if isinstance(e, ValueError) else ValueError(str(e)))
                continue
            stream = RequestStream(request_id, self.abort)
            self._streams[request_id] = stream
            fut.set_result(stream)
        self._take_snapshot()

    async def _run_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._apply_pending()
            if not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                if not self._pending_adds and not self._pending_aborts:
                    await self._wakeup.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._worker, self.engine.step)
            except Exception as e:  # noqa: BLE001 - fail the running requests, keep serving
                self._fail_all(e)
                if self.engine.has_unfinished_requests():
                    await asyncio.sleep(0.1)      # do not spin on a persistently failing step
                continue
            self._take_snapshot()
            self._dispatch(outputs, time.monotonic())

    @staticmethod
    def _notify(listeners: list, *args) -> None:
        for listener in listeners:
            try:
                listener(*args)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                logger.exception("listener %r failed", listener)

    def _dispatch(self, outputs: list[RequestOutput], now: float) -> None:
        self._notify(self.output_listeners, outputs, now)
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue          # aborted by its consumer in the meantime
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_all(self, error: Exception) -> None:
        self.num_step_errors += 1
        logger.error("engine step failed; failing %d running request(s)", len(self._streams),
                     exc_info=error)
        ids = list(self._streams)
        try:
            self.engine.abort_request(ids)
        except Exception:  # noqa: BLE001
            logger.exception("aborting after a failed step failed")
        wrapped = EngineStepError(f"the engine failed while running this request: "
                                  f"{type(error).__name__}: {error}")
        for rid in ids:
            self._streams.pop(rid).put(wrapped)
        self._take_snapshot()


class DeltaTracker:
    """What each streamed choice has sent so far: only new text goes out in a chunk.

    While a choice runs, the last (longest stop string - 1) characters are held back:
    they could still turn out to be the start of a stop string, which is trimmed from
    the final text, and text once sent cannot be taken back.
    """

    def __init__(self, params: SamplingParams) -> None:
        stops = params.stop if not params.include_stop_str_in_output else []
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.sent_chars: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.done: set[int] = set()

    def advance(self, index: int, c: CompletionOutput) -> tuple[str | None, list[int], bool]:
        """(new text or None if nothing to send, new token ids, is this the first chunk)."""
        if index in self.done:
            return None, [], False
        first = index not in self.sent_chars
        chars, toks = self.sent_chars.get(index, 0), self.sent_tokens.get(index, 0)
        end = len(c.text) if c.finish_reason else max(chars, len(c.text) - self.holdback)
        text, tokens = c.text[chars:end], list(c.token_ids[toks:])
        if not text and not tokens and not c.finish_reason:
            return None, [], False
        self.sent_chars[index], self.sent_tokens[index] = max(chars, end), len(c.token_ids)
        if c.finish_reason:
            self.done.add(index)
        return text, tokens, first
