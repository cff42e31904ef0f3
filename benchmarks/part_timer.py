"""Timers around the engine's own objects, for `benchmarks/profile.py`: each part of a
step (a projection, an attention kernel, the sampler, the scheduler...) gets the wall
time spent inside it, less the time of the timed parts it calls.

Invariant: `timed_parts` leaves the engine exactly as it found it. The timers are
instance attributes that shadow the methods (the sampler's __call__, which Python looks
up on the class, is swapped on its class), and all are removed on the way out.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class PartTimer:
    """Exclusive wall time per part: each wrapped call's time, less its wrapped callees'."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self.products: dict[tuple[str, int], list[float]] = defaultdict(list)
        self._stack: list[float] = []

    def wrap(self, part: str, fn: Callable, product: str | None = None) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                inner = self._stack.pop()
                self.seconds[part] += dt - inner
                self.calls[part] += 1
                if self._stack:
                    self._stack[-1] += dt
                if product is not None:       # args[0]: the input rows of the product
                    x = args[0]
                    self.products[product, x.numel() // x.shape[-1]].append(dt - inner)
        return timed


@contextmanager
def timed_parts(llm, timer: PartTimer) -> Iterator[None]:
    """Wrap the engine's model, backend, sampler and scheduler in `timer` (instance
    attributes shadowing the methods; the sampler's __call__ on its class), then undo."""
    from minipaged.models.layers import Linear, RMSNorm, RotaryEmbedding

    engine = llm.llm_engine
    executor = engine.executor
    model = executor.model
    patched: list[tuple[object, str]] = []

    def patch(obj: object, attr: str, part: str, product: str | None = None) -> None:
        setattr(obj, attr, timer.wrap(part, getattr(obj, attr), product))
        patched.append((obj, attr))

    for name, module in model.named_modules():
        if isinstance(module, Linear):
            patch(module, "forward", "layer products", name.rsplit(".", 1)[-1])
        elif isinstance(module, RMSNorm):
            patch(module, "forward", "norms")
        elif isinstance(module, RotaryEmbedding):
            patch(module, "forward", "rotary")
        elif name.endswith(".mlp"):
            patch(module, "forward", "SiLU x up")   # what is left of it: the activation
        elif module is model or name.count(".") <= 2 and name.startswith("layers."):
            patch(module, "forward", "model glue")  # the model, its layers, attention
    patch(model, "compute_logits", "LM head", "lm_head")
    if hasattr(model, "greedy_tokens"):       # greedy rows: the screened LM head
        patch(model, "greedy_tokens", "LM head", "lm_head_greedy")
    backend = executor.backend
    patch(backend, "forward", "model glue")
    patch(backend, "paged_attention_decode", "decode attention")
    patch(backend, "paged_attention_prefill", "prompt attention")
    patch(backend, "reshape_and_cache", "KV cache writes")
    patch(executor.runner, "execute", "model glue")
    patch(engine.scheduler, "schedule", "scheduler")
    patch(engine, "_step", "engine bookkeeping")
    sampler_class = type(engine.sampler)
    original_call = sampler_class.__call__
    sampler_class.__call__ = timer.wrap("sampler", original_call)
    try:
        yield
    finally:
        sampler_class.__call__ = original_call
        for obj, attr in reversed(patched):
            delattr(obj, attr)        # the instance attribute goes; the method shows again
