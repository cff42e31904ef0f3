"""Python's garbage collector, run between engine steps rather than during them.

Not from the paper: it keeps the engine's per-step CPU cost flat in the number of
running sequences (paper section 5 puts the scheduler and the block manager on the CPU,
every iteration, so their cost per sequence must not grow with the batch).

Why it is needed. A step allocates a few container objects per sequence (the batch's
items, samples, outputs) and frees them when the step ends. CPython's collector runs
whenever enough new objects exist: in the middle of a step, many of the step's objects
are still alive, so each young collection moves them to an older generation. With N
sequences there are ~N/700 young collections per step, each moving ~N objects along:
promotions grow like N², and once enough have piled up the collector scans the whole
heap (every module, tensor and object of the process, ~180 000 objects here). At 1024
sequences that cost ~10 µs per sequence-step, on top of ~17 (benchmarks/overhead.py).
Paused for the step and run right after it, the collector finds the step's objects
already freed and moves almost nothing.

Invariant: nothing is left uncollected for long. When the step ends, the collector is
switched back on (only if it was on), and if the step allocated enough to have
triggered a collection, the young generations are collected at once, as the interpreter
would have done; older collections follow CPython's own thresholds from there.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collect_after() -> Iterator[None]:
    """Run the body with automatic collection paused; collect what it left, after."""
    if not gc.isenabled():          # someone else manages the collector: leave it be
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        young, middle, _ = gc.get_count()
        young_limit, middle_limit, _ = gc.get_threshold()
        if young_limit and young > young_limit:
            gc.collect(1 if middle >= middle_limit else 0)
