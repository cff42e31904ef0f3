"""CPU accounting for the peer drivers, from /proc (the peers' venv has no minipaged):
how much CPU a process tree used, and how much everything else used meanwhile.

benchmarks/common.py's `OtherLoad` does the same for one process; a peer engine runs in
several (vLLM's engine core and workers), so here the whole tree under a root pid is
counted as "ours". Invariant: ours + others = the machine's busy time over the window.
"""

from __future__ import annotations

import os
import time


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal: busy = all but idle and iowait
    return sum(fields[:8]) - fields[3] - fields[4]


def _tree_jiffies(root: int) -> int:
    """utime + stime of `root` and every live descendant (threads included)."""
    parent, ticks = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        parent[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])
    total = 0
    for pid, t in ticks.items():
        p = pid
        while p > 1 and p != root:
            p = parent.get(p, 0)
        if p == root:
            total += t
    return total


def _own_jiffies(pid: int) -> int:
    """utime + stime of one process (all its threads), without its children."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class TreeLoad:
    """CPU seconds of the tree under `root` (of `root` alone with children=False), and
    cores' worth used by everything else, between start() and stop()."""

    def __init__(self, root: int, children: bool = True) -> None:
        self.root = root
        self._ours = _tree_jiffies if children else _own_jiffies

    def start(self) -> "TreeLoad":
        self._t0 = time.monotonic()
        self._busy0, self._own0 = _busy_jiffies(), self._ours(self.root)
        return self

    def stop(self) -> tuple[float, float]:
        elapsed = time.monotonic() - self._t0
        tick = os.sysconf("SC_CLK_TCK")
        own = self._ours(self.root) - self._own0
        other = (_busy_jiffies() - self._busy0) - own
        return own / tick, max(0.0, other / tick / max(elapsed, 1e-9))


def wait_for_idle(max_other_cores: float = 0.3, timeout_s: float = 120.0,
                  sample_s: float = 1.0, children: bool = True) -> float:
    """Wait until other processes use < max_other_cores (our tree excluded; only this
    process with children=False, so that our own idle servers count as others) or
    timeout; returns the last measurement."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = TreeLoad(os.getpid(), children).start()
        time.sleep(sample_s)
        cores = load.stop()[1]
        if cores < max_other_cores or time.monotonic() >= deadline:
            return cores
        print(f"  waiting for idle cores: other processes use {cores:.2f} cores", flush=True)
