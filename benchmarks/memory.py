"""KV memory utilisation, paged vs contiguous (paper section 2.3, Fig. 2).

Fig. 2 of the paper splits the KV memory that a serving system has set aside into token
states and three kinds of waste, and finds only 20.4 / 26.8 / 38.2 % of it holding token
state for Orca (Max / Pow2 / Oracle) against 96.3 % for vLLM. Here the same split is
measured, not estimated: Alpaca- and ShareGPT-shaped traces (see `common.TRACE_NOTE`)
with Poisson arrivals at twice the rate paged memory can serve are replayed through the
REAL allocators (`ContiguousAllocator` for the Orca baselines, `BlockManager` for paged,
block sizes 8, 16, 32) by `minipaged.core.replay.replay`: requests arrive, are admitted
FCFS, grow a token per step and free their memory when done, so holes, and the external
fragmentation they cause, happen for real. Every step's memory is counted by
`minipaged.core.report` and the shares are averaged over the steps.

The fair target for paging is not 100 %: each live sequence's last block is partly
filled. The *last-block bound* of a step is sum(tokens) / sum(ceil(tokens / B) * B) over
the live sequences; it is averaged over steps exactly as the measured utilisation is.
The measured paged utilisation divides the token state by the blocks the allocator
itself reports as taken (num_blocks - num_free_blocks), so a leaked or over-reserved
block would open a gap to the bound.

    python -m benchmarks.memory            # -> docs/results/memory.{csv,png,md}
    python -m benchmarks.memory --smoke --out /tmp/m

Invariant: every system replays the same trace (same lengths, same arrival times) in the
same number of token slots.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np

from minipaged.core.contiguous import ContiguousAllocator
from minipaged.core.report import live_seq_ids
from minipaged.core.replay import contiguous_factory, paged_factory, replay

from .common import (BUDGET_NOTE, KV_BUDGET_TOKENS, MAX_LEN, STEP_SECONDS, TRACE_NOTE,
                     add_common_args, command_line, format_table, last_block_bound,
                     markdown_table, out_dir, pyplot, saturated_trace, write_csv,
                     write_markdown)

PAPER = {"Orca (Max)": 20.4, "Orca (Pow2)": 26.8, "Orca (Oracle)": 38.2}   # Fig. 2, %
PAPER_PAGED = 96.3
BLOCK_SIZES = (8, 16, 32)
MAX_NUM_SEQS = 512
NUM_REQUESTS = {"alpaca": 4000, "sharegpt": 1000}
SMOKE_REQUESTS = {"alpaca": 60, "sharegpt": 12}
SMOKE_BUDGET = 1024     # with a 256-token context: Orca (Max) holds 4 requests
SMOKE_MAX_LEN = 256


def systems(max_len: int = MAX_LEN, block_sizes=BLOCK_SIZES
            ) -> list[tuple[str, Callable, int | None]]:
    """(name, allocator factory, block size or None for contiguous)."""
    out = [(f"Orca ({p.capitalize()})", contiguous_factory(p, max_len), None)
           for p in ("max", "pow2", "oracle")]
    out += [(f"paged B={b}", paged_factory(b), b) for b in block_sizes]
    return out


def measure(trace, factory, block_size: int | None, capacity: int) -> dict:
    """Replay the trace; average every step's memory shares (in %) over the steps."""
    per_step: list[tuple[float, float]] = []   # paged: (allocator-measured, bound)

    def on_step(step: int, alloc) -> None:
        if isinstance(alloc, ContiguousAllocator):
            return
        lengths = [len(alloc.get_token_ids(s)) for s in live_seq_ids(alloc)]
        tokens, bound_slots = last_block_bound(lengths, block_size)
        held_slots = (alloc.num_blocks - alloc.num_free_blocks) * block_size
        per_step.append((tokens / held_slots, tokens / bound_slots))

    t0 = time.perf_counter()
    result = replay(trace, factory, capacity, max_num_seqs=MAX_NUM_SEQS,
                    step_seconds=STEP_SECONDS, on_step=on_step)
    reports = [r.report for r in result.records]
    pie = np.array([r.token_state + r.wasted for r in reports], dtype=float)

    def share(attr: str) -> float:
        return 100 * float(np.mean([getattr(r, attr) for r in reports] / pie))

    row = dict(token_state_pct=share("token_state"), reserved_pct=share("reserved_unused"),
               internal_frag_pct=share("internal_fragmentation"),
               external_frag_pct=share("external_fragmentation"),
               of_allocated_pct=100 * result.mean_utilisation)
    if per_step:
        measured, bound = (100 * float(np.mean(x)) for x in zip(*per_step))
        row.update(allocator_measured_pct=measured, last_block_bound_pct=bound,
                   gap_to_bound_pp=bound - measured)
    row.update(mean_running=result.mean_batch, steps=result.num_steps,
               preemptions=result.num_preemptions, seconds=time.perf_counter() - t0)
    return row


def plot(rows: list[dict], path) -> None:
    """Paper Fig. 2 as stacked bars: token state and the three kinds of waste, per system."""
    plt = pyplot()
    traces = list(dict.fromkeys(r["trace"] for r in rows))
    parts = [("token_state_pct", "token state", "#2a9d8f"),
             ("reserved_pct", "reserved", "#e9c46a"),
             ("internal_frag_pct", "internal frag.", "#f4a261"),
             ("external_frag_pct", "external frag.", "#e76f51")]
    fig, axes = plt.subplots(1, len(traces), figsize=(5.5 * len(traces), 4.5), squeeze=False)
    for ax, trace in zip(axes[0], traces):
        mine = [r for r in rows if r["trace"] == trace]
        x = np.arange(len(mine))
        bottom = np.zeros(len(mine))
        for key, label, color in parts:
            vals = np.array([r[key] for r in mine])
            ax.bar(x, vals, bottom=bottom, color=color, label=label)
            bottom += vals
        for i, r in enumerate(mine):
            ax.text(i, r["token_state_pct"] / 2, f"{r['token_state_pct']:.1f}", ha="center",
                    fontsize=8, color="white")
            if "last_block_bound_pct" in r:
                ax.plot([i - 0.4, i + 0.4], [r["last_block_bound_pct"]] * 2, "k-", lw=1.5,
                        label="last-block bound" if i == len(mine) - 1 else None)
        ax.set_xticks(x, [r["system"].replace(" ", "\n", 1) for r in mine], fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("share of the KV memory set aside (%)")
        ax.set_title(f"{trace} trace")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("KV memory utilisation (paper Fig. 2), real allocators, same budget")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def verdict(rows: list[dict]) -> str:
    """The issue's targets (paged >= 96 % and within 0.5 pp of the bound), per trace."""
    parts = []
    for r in rows:
        if r["system"] == "paged B=16":
            meets = "meets" if r["token_state_pct"] >= 96 else "below"
            parts.append(f"{r['trace']} {r['token_state_pct']:.1f} % ({meets} 96 %; bound "
                         f"{r['last_block_bound_pct']:.1f} %, gap "
                         f"{r['gap_to_bound_pp']:.3f} pp)")
    worst = max(abs(r.get("gap_to_bound_pp", 0.0)) for r in rows)
    return ("paged B=16: " + "; ".join(parts) + f". Largest gap to the last-block bound at "
            f"any block size: {worst:.3f} pp (the allocator holds exactly ceil(len/B) blocks "
            "per live sequence: no leaked or early-reserved block)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    out = out_dir(args, "memory")
    counts = SMOKE_REQUESTS if args.smoke else NUM_REQUESTS
    capacity = SMOKE_BUDGET if args.smoke else KV_BUDGET_TOKENS
    max_len = SMOKE_MAX_LEN if args.smoke else MAX_LEN
    print(f"{BUDGET_NOTE}\n{TRACE_NOTE}" if not args.smoke
          else f"smoke: {capacity} slots, context {max_len}")

    rows, rates = [], {}
    for name, num in counts.items():
        trace, rates[name] = saturated_trace(name, num, capacity, max_len=max_len)
        for system, factory, block_size in systems(max_len):
            row = dict(trace=name, system=system, requests=num)
            row.update(measure(trace, factory, block_size, capacity))
            rows.append(row)
            print(f"  {name:8s} {system:14s} token state {row['token_state_pct']:5.1f} %"
                  f"  ({row['seconds']:.1f} s)", flush=True)

    columns = ["trace", "system", "token_state_pct", "reserved_pct", "internal_frag_pct",
               "external_frag_pct", "last_block_bound_pct", "gap_to_bound_pp", "mean_running"]
    print(format_table(rows, columns))
    write_csv(rows, out / "memory.csv")
    plot(rows, out / "memory.png")

    headers = {"token_state_pct": "token state %", "reserved_pct": "reserved %",
               "internal_frag_pct": "internal frag. %", "external_frag_pct": "external frag. %",
               "last_block_bound_pct": "last-block bound %", "gap_to_bound_pp": "gap (pp)",
               "mean_running": "mean running"}
    paged16 = {r["trace"]: r for r in rows if r["system"] == "paged B=16"}
    alpaca_bound = paged16.get("alpaca", {}).get("last_block_bound_pct", float("nan"))
    notes = [
        BUDGET_NOTE if not args.smoke
        else f"smoke run: {capacity} token slots, context {max_len}",
        TRACE_NOTE + "; " + ", ".join(f"{k}: {counts[k]} requests, Poisson arrivals at "
                                       f"{rates[k]:.1f} req/s" for k in counts)
        + f" (2x what paged memory serves; one step = {STEP_SECONDS} s)",
        "shares are of the memory set aside (token state + reserved + internal + external "
        "fragmentation), per step, averaged over the steps; external fragmentation = holes "
        "too small for the next waiting request's reservation",
        "last-block bound: per step, sum(tokens) / sum(ceil(tokens/B)*B) over the live "
        "sequences, averaged the same way; paged's measured share uses the blocks the "
        "allocator reports as taken",
        "paper (Fig. 2, OPT-13B, its own traces): " + ", ".join(
            f"{k} {v} %" for k, v in PAPER.items()) + f", vLLM {PAPER_PAGED} %. On Alpaca-"
        "shaped requests (~78 tokens at the end, ~50 on average while live) the last "
        f"partly filled block alone caps paging at {alpaca_bound:.1f} % "
        "at B=16: the bound, not 96 %, is the fair target there",
    ]
    notes.insert(0, verdict(rows))
    print(notes[0])
    write_markdown(out / "memory.md", command_line("memory", argv), notes,
                   [markdown_table(rows, columns, headers)])
    print(f"wrote {out / 'memory.csv'}, {out / 'memory.png'}, {out / 'memory.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
