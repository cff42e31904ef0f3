"""Replay a request-length trace through the real allocators, memory only (the
measurements of the paper's Fig. 2 and of its batch-size claim, section 6).

`replay` runs a trace (`minipaged.core.trace`) through a `ContiguousAllocator` with one
of the Orca policies, or through the paged `BlockManager`, in an iteration-level
simulation: admit first come, first served while memory allows, every running request
grows by one token per step, finished requests free their memory; it records the
`MemoryReport` of every step. No model runs, and token ids are placeholders.

Invariant to keep in mind: a request's memory holds ``prompt_len + generated`` tokens,
and it is freed the step it reaches ``final_len = prompt_len + output_len``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from minipaged.core.block_manager import AllocStatus, BlockManager
from minipaged.core.contiguous import ContiguousAllocator
from minipaged.core.report import MemoryReport, report
from minipaged.core.trace import Request


def contiguous_factory(policy: str, max_len: int = 2048) -> Callable[[int], ContiguousAllocator]:
    """An allocator_factory for `replay`: an Orca baseline over ``capacity`` slots."""
    return lambda capacity: ContiguousAllocator(capacity, policy, max_len)  # type: ignore[arg-type]


def paged_factory(block_size: int = 16, watermark: float = 0.0) -> Callable[[int], BlockManager]:
    """An allocator_factory for `replay`: a BlockManager with ``capacity // block_size``
    blocks (no watermark by default, so that both sides get exactly the same memory)."""
    return lambda capacity: BlockManager(capacity // block_size, block_size, watermark=watermark)


@dataclass
class StepRecord:
    step: int
    time: float
    num_running: int
    num_waiting: int
    report: MemoryReport


@dataclass
class ReplayResult:
    records: list[StepRecord] = field(default_factory=list)
    num_finished: int = 0
    num_preemptions: int = 0

    @property
    def num_steps(self) -> int:
        return len(self.records)

    @property
    def mean_utilisation(self) -> float:
        """Mean over steps of token_state / allocated slots."""
        return float(np.mean([r.report.utilisation for r in self.records])) if self.records else 0.0

    @property
    def mean_paper_utilisation(self) -> float:
        """Mean over steps of the paper's Fig. 2 token-state share."""
        vals = [r.report.paper_utilisation for r in self.records]
        return float(np.mean(vals)) if vals else 0.0

    @property
    def mean_batch(self) -> float:
        return float(np.mean([r.num_running for r in self.records])) if self.records else 0.0

    @property
    def peak_batch(self) -> int:
        return max((r.num_running for r in self.records), default=0)

    def summary(self) -> dict[str, Any]:
        return dict(num_steps=self.num_steps, num_finished=self.num_finished,
                    num_preemptions=self.num_preemptions, mean_batch=self.mean_batch,
                    peak_batch=self.peak_batch, mean_utilisation=self.mean_utilisation,
                    mean_paper_utilisation=self.mean_paper_utilisation)


@dataclass(eq=False)   # identity: two requests are never "equal"
class _Live:
    """A request in the simulation: its index in the trace and its current length."""

    rid: int
    req: Request
    length: int


class _Memory:
    """The four things the simulation asks of an allocator, for both kinds."""

    def __init__(self, alloc: Any) -> None:
        self.alloc = alloc
        self.paged = not isinstance(alloc, ContiguousAllocator)

    def ever_fits(self, req: Request) -> bool:
        a = self.alloc
        if self.paged:   # could the whole request ever be admitted, as one prompt?
            return a.can_allocate([0] * req.final_len) != AllocStatus.NEVER
        return a.reservation_size(req.prompt_len, req.final_len) <= a.capacity

    def try_admit(self, r: _Live) -> bool:
        if self.paged:
            tokens = [r.rid] * r.length   # placeholders: only the length matters here
            if self.alloc.can_allocate(tokens) != AllocStatus.OK:
                return False
            self.alloc.allocate([r.rid], tokens)
            return True
        # A contiguous request is never preempted, so it is admitted with its prompt.
        if not self.alloc.can_allocate(r.req.prompt_len, r.req.final_len):
            return False
        self.alloc.allocate(r.rid, r.req.prompt_len, r.req.final_len)
        return True

    def can_grow(self, r: _Live) -> bool:
        return not self.paged or self.alloc.can_append_slots([r.rid])

    def grow(self, r: _Live) -> None:
        if self.paged:
            self.alloc.append_slots(r.rid, [r.rid])
        else:
            self.alloc.append(r.rid)
        r.length += 1

    def free(self, r: _Live) -> None:
        self.alloc.free(r.rid)

    def report(self, waiting: deque) -> MemoryReport:
        if self.paged or not waiting:
            return report(self.alloc)
        head = waiting[0].req
        return report(self.alloc, next_reservation=self.alloc.reservation_size(
            head.prompt_len, head.final_len))


def replay(trace: list[Request], allocator_factory: Callable[[int], Any], capacity_tokens: int,
           max_num_seqs: int = 256, step_seconds: float = 0.05,
           on_step: Callable[[int, Any], None] | None = None) -> ReplayResult:
    """Serve ``trace`` with the memory of ``allocator_factory(capacity_tokens)``.

    Each step: every running request grows by one token (paged memory may have to
    preempt the most recently admitted request to make room: it is freed and waits at
    the head of the queue to be recomputed); then, if nothing was preempted, waiting
    requests that have arrived are admitted first come, first served, until the next
    one does not fit or ``max_num_seqs`` run; the step's `MemoryReport` is recorded;
    finished requests are freed. A step lasts ``step_seconds`` of trace time; idle time
    with nothing to run is skipped. ``on_step(step, allocator)`` sees the memory
    before the finished requests are freed (to draw it, say).
    """
    if capacity_tokens < 1:
        raise ValueError(f"capacity_tokens must be >= 1, got {capacity_tokens}")
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    mem = _Memory(allocator_factory(capacity_tokens))
    for req in trace:
        if not mem.ever_fits(req):
            raise ValueError(f"capacity_tokens={capacity_tokens} can never hold a request "
                             f"of {req.final_len} tokens with this allocator")
    arrivals = deque(sorted((_Live(i, r, r.prompt_len) for i, r in enumerate(trace)),
                            key=lambda x: x.req.arrival_time))
    waiting: deque[_Live] = deque()
    running: list[_Live] = []
    result = ReplayResult()
    step = 0
    while arrivals or waiting or running:
        if not running and not waiting:   # idle: jump to the next arrival
            step = max(step, math.ceil(arrivals[0].req.arrival_time / step_seconds))
        while arrivals and arrivals[0].req.arrival_time <= step * step_seconds:
            waiting.append(arrivals.popleft())

        preempted = False
        for r in list(running):
            if r not in running:   # preempted earlier in this loop
                continue
            while not mem.can_grow(r):
                victim = running.pop()   # the most recently admitted
                mem.free(victim)
                waiting.appendleft(victim)
                result.num_preemptions += 1
                preempted = True
                if victim is r:
                    break
            if r in running:
                mem.grow(r)

        while not preempted and waiting and len(running) < max_num_seqs:
            if not mem.try_admit(waiting[0]):
                break
            running.append(waiting.popleft())

        if running:
            result.records.append(StepRecord(step, step * step_seconds, len(running),
                                             len(waiting), mem.report(waiting)))
            if on_step is not None:
                on_step(step, mem.alloc)
        for r in [r for r in running if r.length >= r.req.final_len]:
            running.remove(r)
            mem.free(r)
            result.num_finished += 1
        step += 1
    return result
