"""A look at the paged KV-cache memory manager at work (`python -m minipaged.memory_demo`).

Paper sections 4.2-4.4 and Fig. 2/3: random requests go through the `BlockManager`
for a few dozen steps — admitted, grown one token per step, forked (parallel samples
that share blocks until their first write, copy-on-write), preempted when the blocks
run out, freed when done — and the memory map is printed every few steps. Then the
same requests run through Orca (Max), the contiguous baseline, in the same memory, for
contrast: the paged side keeps more requests running and wastes at most one partly
filled block per sequence.

Invariant to keep in mind: this is memory only — no model runs; token ids are
placeholders. Deterministic for a given seed, and fast (well under a second).
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass
from typing import TextIO

from minipaged.core.block_manager import AllocStatus, BlockManager
from minipaged.core.memory_map import LEGEND, render_memory_map
from minipaged.core.report import report
from minipaged.core.replay import contiguous_factory, paged_factory, replay
from minipaged.core.trace import Request


@dataclass
class DemoConfig:
    seed: int = 0
    steps: int = 40
    num_blocks: int = 32
    block_size: int = 4
    num_requests: int = 12
    max_len: int = 32          # the "model's" context: what Orca (Max) reserves
    fork_prob: float = 0.15    # chance per step of forking a running sequence
    snapshots: int = 4         # memory maps printed during part 1
    width: int = 64


def make_requests(cfg: DemoConfig) -> list[Request]:
    """Short random requests arriving about one every two steps."""
    rng = random.Random(cfg.seed)
    reqs, t = [], 0.0
    for _ in range(cfg.num_requests):
        prompt = rng.randint(2, cfg.max_len // 3)
        output = rng.randint(2, cfg.max_len // 2)
        reqs.append(Request(prompt, min(output, cfg.max_len - prompt), t))
        t += rng.choice([0, 1, 1, 2, 3])
    return reqs


def run_paged(cfg: DemoConfig, reqs: list[Request], out: TextIO) -> None:
    """Part 1: step through the block manager, printing what happens."""
    rng = random.Random(cfg.seed + 1)
    bm = BlockManager(cfg.num_blocks, cfg.block_size, watermark=0.0)
    waiting = list(range(len(reqs)))          # request indices, FCFS
    final = {}                                 # seq id -> final length
    length = {}                                # seq id -> current length
    running: list[str] = []                    # seq ids, admission order
    snap_every = max(1, cfg.steps // max(1, cfg.snapshots))
    for step in range(cfg.steps):
        if not running and not waiting:
            print(f"step {step:3d} | every request is done; all blocks are free again\n",
                  file=out)
            break
        events = []
        # every running sequence generates one token (copy-on-write if its block is shared)
        preempted = False
        for sid in list(running):
            if sid not in running:
                continue
            while not bm.can_append_slots([sid]):   # out of blocks: preempt the newest
                victim = running.pop()
                bm.free(victim)
                preempted = True
                if "." in victim:   # a parallel sample: dropped, its parent goes on
                    events.append(f"drop sample {victim}")
                else:               # keeps its tokens; their K/V is recomputed later
                    events.append(f"preempt {victim}")
                    waiting.insert(0, int(victim[1:]))
                if victim == sid:
                    break
            if sid in running:
                copies = bm.append_slots(sid, [0])
                length[sid] += 1
                if copies:
                    events.append(f"CoW {sid} block {copies[0][0]}->{copies[0][1]}")
        # admit the requests that have arrived, first come first served (not in a step
        # that just preempted: the freed blocks are for the running ones)
        while not preempted and waiting and reqs[waiting[0]].arrival_time <= step:
            r = reqs[waiting[0]]
            sid = f"r{waiting[0]}"
            resumed = sid in length
            n = length[sid] if resumed else r.prompt_len
            if bm.can_allocate([0] * n) != AllocStatus.OK:
                break
            bm.allocate([sid], [0] * n)
            final[sid], length[sid] = r.final_len, n
            running.append(sid)
            waiting.pop(0)
            events.append(f"resume {sid} (recompute {n} tokens)" if resumed
                          else f"admit {sid} ({r.prompt_len}+{r.output_len} tokens)")
        # now and then a parallel sample: the child shares all of the parent's blocks
        parents = [s for s in running if "." not in s and length[s] < final[s]]
        if parents and not preempted and rng.random() < cfg.fork_prob:
            parent = rng.choice(parents)
            child = f"{parent}.{sum(s.startswith(parent + '.') for s in final) + 1}"
            bm.fork(parent, child)
            final[child], length[child] = final[parent], length[parent]
            running.append(child)
            events.append(f"fork {parent}->{child}")
        done = [s for s in running if length[s] >= final[s]]
        events += [f"done {s}" for s in done]
        rep = report(bm)
        print(f"step {step:3d} | running {len(running):2d} | blocks "
              f"{cfg.num_blocks - bm.num_free_blocks:3d}/{cfg.num_blocks} | "
              f"utilisation {rep.utilisation:6.1%} | {', '.join(events) or '-'}", file=out)
        if step % snap_every == snap_every - 1:
            print(f"\n{render_memory_map(bm, width=cfg.width, legend=False)}\n{rep}\n",
                  file=out)
        for sid in done:   # freed after the picture, so it shows their last token
            running.remove(sid)
            bm.free(sid)


def run_contrast(cfg: DemoConfig, reqs: list[Request], out: TextIO) -> None:
    """Part 2: the same requests (no forks) through Orca (Max) and paged memory."""
    capacity = cfg.num_blocks * cfg.block_size
    # Requests arrive once per demo step; replay's step_seconds=1 keeps that clock.
    systems = [("Orca (Max)", contiguous_factory("max", cfg.max_len)),
               ("paged", paged_factory(cfg.block_size))]
    for name, factory in systems:
        pictures: dict[int, str] = {}
        result = replay(reqs, factory, capacity, step_seconds=1.0,
                        on_step=lambda step, alloc: pictures.__setitem__(
                            step, render_memory_map(alloc, width=cfg.width, legend=False)))
        busiest = max(result.records, key=lambda r: r.num_running)
        print(f"{name}: memory at step {busiest.step}, its busiest "
              f"({busiest.num_running} running)", file=out)
        print(pictures[busiest.step], file=out)
        print(f"{busiest.report}", file=out)
        s = result.summary()
        print(f"{name}: mean utilisation {s['mean_utilisation']:.1%}, mean batch "
              f"{s['mean_batch']:.1f}, peak batch {s['peak_batch']}, all "
              f"{s['num_finished']} requests done in {s['num_steps']} steps\n", file=out)


def run(cfg: DemoConfig, out: TextIO | None = None) -> None:
    out = sys.stdout if out is None else out   # looked up now: tests capture stdout
    reqs = make_requests(cfg)
    print(f"minipaged demo: the KV-cache memory manager (seed {cfg.seed})\n", file=out)
    print(f"Part 1: paged memory, {cfg.num_blocks} blocks x {cfg.block_size} slots, "
          f"{len(reqs)} requests", file=out)
    print(LEGEND + "\n", file=out)
    run_paged(cfg, reqs, out)
    print(f"Part 2: the same requests in the same {cfg.num_blocks * cfg.block_size} "
          f"slots, contiguous (Orca Max, reserving max_len={cfg.max_len}) vs paged\n",
          file=out)
    run_contrast(cfg, reqs, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minipaged.memory_demo", description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=DemoConfig.seed)
    p.add_argument("--steps", type=int, default=DemoConfig.steps)
    p.add_argument("--blocks", type=int, default=DemoConfig.num_blocks)
    p.add_argument("--block-size", type=int, default=DemoConfig.block_size)
    p.add_argument("--requests", type=int, default=DemoConfig.num_requests)
    p.add_argument("--max-len", type=int, default=DemoConfig.max_len)
    p.add_argument("--width", type=int, default=DemoConfig.width)
    a = p.parse_args(argv)
    cfg = DemoConfig(seed=a.seed, steps=a.steps, num_blocks=a.blocks, block_size=a.block_size,
                     num_requests=a.requests, max_len=a.max_len, width=a.width)
    for name in ("steps", "num_blocks", "block_size", "num_requests", "width"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"{name} must be >= 1")
    if cfg.max_len < 6:
        raise SystemExit("max_len must be >= 6")
    if cfg.max_len > cfg.num_blocks * cfg.block_size:
        raise SystemExit("max_len must fit in the memory (blocks x block size)")
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
