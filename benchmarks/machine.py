"""The machine a timed benchmark runs on: what it is, how busy it was at the start, and
how much CPU other processes took during a run (so that a result can say whether it
shared its cores), and its fp32 matrix-product peak (what the engines' rates are shares of).

Nothing here is from the paper. The machine is shared: a 2-thread run that overlapped
another busy process ran 20x slower here, so the timed benchmarks wait for idle cores
before each run and record the other processes' CPU use during it.

Invariant: `OtherLoad` counts only other processes' time (all CPU time on the machine
minus this process's own, every thread included), so a benchmark's own threads never
read as interference.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import torch


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal: busy = all but idle and iowait
    return sum(fields[:8]) - fields[3] - fields[4]


def _own_jiffies() -> int:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])   # utime, stime (this process, all threads)


class OtherLoad:
    """Cores' worth of CPU that OTHER processes used between start() and stop()
    (from /proc/stat minus this process's own time); None where /proc is missing."""

    def __init__(self) -> None:
        self.cores: float | None = None
        self._start: tuple[int, int, float] | None = None

    def start(self) -> "OtherLoad":
        try:
            self._start = (_busy_jiffies(), _own_jiffies(), time.monotonic())
        except OSError:
            self._start = None
        return self

    def stop(self) -> float | None:
        if self._start is None:
            return None
        busy0, own0, t0 = self._start
        elapsed = time.monotonic() - t0
        other = (_busy_jiffies() - busy0) - (_own_jiffies() - own0)
        self.cores = max(0.0, other / os.sysconf("SC_CLK_TCK") / max(elapsed, 1e-9))
        return self.cores

    def __enter__(self) -> "OtherLoad":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_idle(max_other_cores: float = 0.3, timeout_s: float = 120.0,
                  sample_s: float = 1.0) -> float | None:
    """Wait until other processes use less than `max_other_cores` over `sample_s`, or
    until `timeout_s`; returns the last measured use (the caller records it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        load = OtherLoad().start()
        time.sleep(sample_s)
        cores = load.stop()
        if cores is None or cores < max_other_cores or time.monotonic() >= deadline:
            return cores
        print(f"  waiting for idle cores: other processes use {cores:.2f} cores", flush=True)


#: the 1-minute load average when the benchmark started (this module is imported first);
#: read again when the report is written, it would count the benchmark's own last minute
_LOAD_AT_START = round(os.getloadavg()[0], 2)


def machine_info() -> dict[str, Any]:
    """The CPU's name with its family and model numbers: hosts of one kind of machine
    here have all called themselves "AMD EPYC" while their AVX-512 units differed (a
    Zen 5's run 16 floats at full width, a Zen 4's in two halves)."""
    cpu = platform.processor() or "unknown CPU"
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():
                    break                      # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" in fields:
        cpu = fields["model name"]
        if "cpu family" in fields and "model" in fields:
            cpu += f" (family {fields['cpu family']}, model {fields['model']})"
    return dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(),
                torch=torch.__version__, load_avg_1min=_LOAD_AT_START)


def machine_line() -> str:
    m = machine_info()
    return (f"{m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']}; "
            f"load average {m['load_avg_1min']} at the start")


def matmul_peak(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """fp32 GFLOP/s of the best of `repeats` [n x n] x [n x n] products on `threads`
    threads, through each GEMM library torch has here (MKL, behind `a @ b`, and oneDNN,
    with a packed weight): on some CPUs one of them leaves half the machine unused (MKL
    runs its AVX2 code on AMD's AVX-512 cores), and the peak is what the machine can do."""
    from minipaged.models import packed_linear as gemms

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    products = {"mkl": lambda: a @ b}
    if gemms._works("onednn"):
        pack, run = gemms._LIBRARIES["onednn"]
        packed = pack(b)
        products["onednn"] = lambda: run(a, packed, b, None, n)
    best = float("inf")
    with torch.inference_mode():
        for product in products.values():
            for _ in range(2):
                product()
            for _ in range(repeats):
                t0 = time.perf_counter()
                product()
                best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9
