"""Request-length traces shaped like the paper's workloads, and a memory-only replay.

Paper section 6.1 / Fig. 11: the Alpaca workload has short prompts and outputs (mean
input 19.31, output 58.45 tokens); ShareGPT has 8.4x longer prompts and 5.8x longer
outputs (means 161.31 / 337.99) with a much higher variance. No data set can be fetched
here, so `make_trace` draws lengths from log-normals fitted to those means:

- sigma (the spread of log length): Alpaca 0.6 (coefficient of variation 0.66: the
  Fig. 11 histograms of Alpaca stay within a few times their mean), ShareGPT 1.0 (CV
  1.31: its histograms spread over the whole context with a long tail).
- mu is fitted so that the mean *after* capping at the context (prompt + output <=
  max_len) is the paper's mean, not the mean before the cap, which for ShareGPT at
  2048 would be about 4 % too low.

`replay` runs a trace through the REAL allocators (`ContiguousAllocator` with each Orca
policy, or the paged `BlockManager`) in an iteration-level simulation — admit FCFS
while memory allows, every running request grows by one token per step, finished
requests free their memory — and records the `MemoryReport` of every step. It models
memory only: no model runs, and token ids are placeholders.

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


@dataclass(frozen=True)
class Request:
    prompt_len: int
    output_len: int
    arrival_time: float = 0.0

    @property
    def final_len(self) -> int:
        return self.prompt_len + self.output_len


@dataclass(frozen=True)
class TraceShape:
    """Target means (paper Fig. 11) and log-normal sigmas of one workload."""

    mean_prompt: float
    mean_output: float
    sigma_prompt: float
    sigma_output: float


TRACE_SHAPES = {
    "alpaca": TraceShape(19.31, 58.45, 0.6, 0.6),
    "sharegpt": TraceShape(161.31, 337.99, 1.0, 1.0),
}


def capped_lognormal_mean(mu: float, sigma: float, cap: float) -> float:
    """E[min(X, cap)] for X ~ LogNormal(mu, sigma), in closed form."""
    phi = lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))  # noqa: E731
    z = (math.log(cap) - mu) / sigma
    return math.exp(mu + sigma**2 / 2) * phi(z - sigma) + cap * (1.0 - phi(z))


def fit_mu(mean: float, sigma: float, cap: float) -> float:
    """The mu whose log-normal, capped at ``cap``, has this mean (bisection).

    Starts from the uncapped fit ``log(mean) - sigma^2 / 2`` (a capped mean can only be
    smaller) and searches up to 3 above it; if the cap is so tight that even that falls
    short, lengths simply pile up at the cap.
    """
    lo = math.log(mean) - sigma**2 / 2
    hi = lo + 3.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if capped_lognormal_mean(mid, sigma, cap) < mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def make_trace(name: str, num_requests: int, seed: int = 0, max_len: int = 2048,
               request_rate: float | None = None) -> list[Request]:
    """``num_requests`` requests with Alpaca- or ShareGPT-shaped lengths, seeded.

    Every request has prompt_len >= 1, output_len >= 1 and prompt + output <= max_len.
    With ``request_rate`` (requests per second) arrivals are a Poisson process;
    without one, every request arrives at time 0.
    """
    if name not in TRACE_SHAPES:
        raise ValueError(f"name must be one of {sorted(TRACE_SHAPES)}, got {name!r}")
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (one prompt and one output token), got {max_len}")
    if request_rate is not None and not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 or None, got {request_rate}")
    shape = TRACE_SHAPES[name]
    rng = np.random.default_rng(seed)
    mu_p = fit_mu(shape.mean_prompt, shape.sigma_prompt, max_len - 1)
    # The output's cap is what the prompt leaves of the context; fit to a typical one.
    mu_o = fit_mu(shape.mean_output, shape.sigma_output, max(1.0, max_len - shape.mean_prompt))
    prompt = np.clip(np.rint(rng.lognormal(mu_p, shape.sigma_prompt, num_requests)),
                     1, max_len - 1).astype(int)
    output = np.rint(rng.lognormal(mu_o, shape.sigma_output, num_requests)).astype(int)
    output = np.clip(output, 1, max_len - prompt)
    if request_rate is None:
        arrival = np.zeros(num_requests)
    else:
        arrival = np.cumsum(rng.exponential(1.0 / request_rate, num_requests))
    return [Request(int(p), int(o), float(t)) for p, o, t in zip(prompt, output, arrival)]


# ---- replay --------------------------------------------------------------------------


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
