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

Each request's outputs reach its client through a `RequestStream`
(request_stream.py).

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
from minipaged.entrypoints.request_stream import RequestStream
from minipaged.outputs import RequestOutput
from minipaged.sampling import SamplingParams

logger = logging.getLogger(__name__)

OutputListener = Callable[[list[RequestOutput], float], None]
AbortListener = Callable[[list[str]], None]


class EngineStepError(RuntimeError):
    """The engine raised inside step(); the requests it was running are failed."""


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
