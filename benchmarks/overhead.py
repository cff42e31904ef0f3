"""Engine overhead per scheduled sequence per step (paper section 5: the scheduler and
the block manager run on the CPU every iteration, outside the model).

N sequences (16 ... 1024) are admitted at once and decode for a long time over a stub
model (`StubExecutor`: no attention, logits that favour the last token + 1), so each step
is all bookkeeping: `Scheduler.schedule()` (which asks the `BlockManager` for every
sequence's next slot), the sampler (not called for these plain greedy rows: their token
comes with the forward), and the engine's processing of the new tokens. The
CPU time of each part is taken with `time.process_time` around the engine's own objects,
over many steady-state steps, and divided by (steps x N). The paged design promises O(1)
work per sequence per step, so the curve against N must stay flat. A second sweep keeps
N fixed and grows the context, to catch work that grows with a sequence's length.

Before each timed point the benchmark waits (up to --idle-timeout seconds) for the other
processes' CPU use to drop, and records how many cores they used during the point.

    python -m benchmarks.overhead            # -> docs/results/overhead.{csv,png,md}
    python -m benchmarks.overhead --smoke --out /tmp/o

Invariant: the timed steps are pure decode steps of all N sequences (asserted), so every
point measures the same work per sequence.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .common import (add_common_args, command_line, format_table, greedy, make_engine,
                     markdown_table, out_dir, prompt_tokens, pyplot, single_threaded_torch,
                     write_csv, write_markdown)
from .machine import OtherLoad, wait_for_idle

BLOCK_SIZE = 16
VOCAB = 64
NUM_SEQS = (16, 32, 64, 128, 256, 512, 1024)
CONTEXT = 64
CONTEXT_SWEEP_SEQS = 128
CONTEXTS = (64, 512, 2048, 8192)
REPEATS = 3


class CpuTimer:
    """Wraps a callable and adds up the process CPU time spent inside it."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.process_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.process_time() - t0


def steps_for(n: int, smoke: bool) -> int:
    """Enough steps for ~8000 sequence-steps per repeat, between 10 and 100."""
    return 3 if smoke else max(10, min(100, 8000 // n))


def measure(n: int, context: int, steps: int, repeats: int, idle_timeout: float) -> dict:
    total_tokens = context + 4 + steps * repeats + 1
    blocks = n * -(-total_tokens // BLOCK_SIZE) + 8
    engine = make_engine(blocks, BLOCK_SIZE, max_model_len=total_tokens + BLOCK_SIZE,
                         vocab_size=VOCAB, max_num_seqs=n,
                         max_num_batched_tokens=max(2048, n * context))
    for i in range(n):
        engine.add_request(str(i), prompt_tokens(i, context, VOCAB), greedy(total_tokens))
    for _ in range(3):                     # prefill, then two decode steps
        engine.step()
    schedule = engine.scheduler.schedule = CpuTimer(engine.scheduler.schedule)
    model = engine.executor.execute = CpuTimer(engine.executor.execute)
    sampler = engine.sampler = CpuTimer(engine.sampler)

    idle_before = wait_for_idle(timeout_s=idle_timeout) if idle_timeout > 0 else None
    per_repeat: list[dict] = []
    for _ in range(repeats):
        for timer in (schedule, model, sampler):
            timer.seconds = 0.0
        gc.collect()
        load = OtherLoad().start()
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(steps):
            engine.step()
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        load.stop()
        work = steps * n
        per_repeat.append(dict(
            engine_us=1e6 * (cpu - model.seconds) / work,
            schedule_us=1e6 * schedule.seconds / work,
            sampler_us=1e6 * sampler.seconds / work,
            stub_model_us=1e6 * model.seconds / work,
            wall_us=1e6 * wall / work,
            other_cores=load.cores))
    stats = engine.stats()
    if stats["num_running"] != n or stats["num_preemptions"]:
        raise RuntimeError(f"expected {n} sequences decoding with no preemption, got {stats}")
    # the median repeat (by engine time) and the others' load during the timed steps
    best = sorted(per_repeat, key=lambda r: r["engine_us"])[len(per_repeat) // 2]
    loads = [r["other_cores"] for r in per_repeat if r["other_cores"] is not None]
    row = dict(num_seqs=n, context=context, steps=steps, repeats=repeats,
               **{k: round(v, 2) for k, v in best.items() if k != "other_cores"},
               engine_us_min=round(min(r["engine_us"] for r in per_repeat), 2),
               other_cores_during=round(statistics.mean(loads), 2) if loads else "",
               other_cores_before=round(idle_before, 2) if idle_before is not None else "")
    return row


def plot(rows: list[dict], sweep: list[dict], path) -> None:
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [("engine_us", "engine step without the model"), ("schedule_us",
              "Scheduler.schedule (incl. block manager)"), ("sampler_us", "sampler")]
    for data, axis, key, label in ((rows, ax, "num_seqs", "running sequences N"),
                                   (sweep, bx, "context", "context length (tokens)")):
        for column, name in series:
            axis.plot([r[key] for r in data], [r[column] for r in data], "o-", label=name)
        axis.set_xscale("log", base=2)
        axis.set_xlabel(label)
        axis.set_ylabel("CPU µs per sequence per step")
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
    ax.set_title(f"vs N (context {CONTEXT} at the start)")
    bx.set_title(f"vs context (N = {sweep[0]['num_seqs'] if sweep else CONTEXT_SWEEP_SEQS})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def flatness(rows: list[dict], sweep: list[dict]) -> str:
    """How flat the per-sequence cost is in N, and how it grows with the context."""
    big = [r for r in rows if r["num_seqs"] >= 64] or rows
    cost = [r["engine_us"] for r in big]
    n = np.array([r["num_seqs"] for r in rows], float)
    slope, intercept = np.polyfit(n, np.array([r["engine_us"] for r in rows]) * n, 1)
    text = (f"engine step without the model, N = {big[0]['num_seqs']}-{big[-1]['num_seqs']}: "
            f"{min(cost):.1f}-{max(cost):.1f} µs per sequence-step (max/min "
            f"{max(cost) / min(cost):.2f}); slope of the step's cost against N (least "
            f"squares): {slope:.1f} µs per added sequence")
    if intercept > 0:
        text += f" + {intercept:.0f} µs fixed per step"
    if len(sweep) > 1:
        text += (f"; context {sweep[0]['context']} -> {sweep[-1]['context']} tokens at "
                 f"N = {sweep[0]['num_seqs']}: {sweep[0]['engine_us']:.1f} -> "
                 f"{sweep[-1]['engine_us']:.1f} µs (schedule() {sweep[0]['schedule_us']:.1f} -> "
                 f"{sweep[-1]['schedule_us']:.1f} µs)")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--idle-timeout", type=float, default=30.0,
                        help="seconds to wait for idle cores before each timed point "
                             "(0: do not wait; --smoke does not wait)")
    args = parser.parse_args(argv)
    single_threaded_torch()
    out = out_dir(args, "overhead")
    idle = 0.0 if args.smoke else args.idle_timeout
    seqs = (4, 8) if args.smoke else NUM_SEQS
    contexts = (16, 64) if args.smoke else CONTEXTS
    repeats = 2 if args.smoke else REPEATS

    rows = []
    for n in seqs:
        rows.append(measure(n, 16 if args.smoke else CONTEXT, steps_for(n, args.smoke),
                            repeats, idle))
        print(f"  N={n:5d}: {rows[-1]['engine_us']:7.2f} µs per sequence-step "
              f"(others used {rows[-1]['other_cores_during']} cores)", flush=True)
    sweep_n = 4 if args.smoke else CONTEXT_SWEEP_SEQS
    sweep = []
    for context in contexts:
        sweep.append(measure(sweep_n, context, steps_for(sweep_n, args.smoke), repeats, idle))
        print(f"  context {context:5d}: {sweep[-1]['engine_us']:7.2f} µs per sequence-step",
              flush=True)

    summary = flatness(rows, sweep)
    print(summary)
    columns = ["num_seqs", "context", "engine_us", "schedule_us", "sampler_us", "stub_model_us",
               "wall_us", "other_cores_during"]
    print(format_table(rows + sweep, columns))
    write_csv(rows + sweep, out / "overhead.csv")
    plot(rows, sweep, out / "overhead.png")
    headers = {"num_seqs": "N", "context": "context at start", "engine_us": "engine µs",
               "schedule_us": "schedule() µs", "sampler_us": "sampler µs",
               "stub_model_us": "stub model µs", "wall_us": "wall µs",
               "other_cores_during": "other processes (cores)"}
    notes = [
        "µs = process CPU time per sequence per step (median of "
        f"{repeats} repeats); engine = the whole LLMEngine.step minus the stub model; "
        "schedule() includes the block manager; wall = elapsed time, for reference",
        summary,
        f"every point: N sequences admitted together, then pure decode steps (greedy, "
        f"block size {BLOCK_SIZE}, vocabulary {VOCAB}, torch on 1 thread); first table "
        f"part: context {CONTEXT} tokens at the start, second: N = {sweep_n}, longer contexts",
        "sampler: 0 since 2026-12-06 (session 13): a plain greedy row's token comes back "
        "with the forward (BatchItem.argmax_only), and the sampler is not called",
        "other processes (cores): CPU the rest of the machine used during the timed steps "
        "(from /proc/stat); timings taken while it is well above 0 are inflated",
    ]
    write_markdown(out / "overhead.md", command_line("overhead", argv), notes,
                   [markdown_table(rows + sweep, columns, headers)])
    print(f"wrote {out / 'overhead.csv'}, {out / 'overhead.png'}, {out / 'overhead.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
