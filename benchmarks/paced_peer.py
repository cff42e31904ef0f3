"""Taking turns with a peer engine in another process, so that two engines' timed runs
meet the same state of a shared machine (benchmarks/throughput.py: minipaged and vLLM).

The machine's speed drifts by 5-10 % within an hour here; two engines timed one after
the other, ten minutes apart, carry that drift into their ratio. Paced, the peer's
driver script (benchmarks/peers/vllm_offline.py with "paced": true) runs each of its
timed repeats only when told to, right before or after one of ours.

Invariant: the peer only runs a timed repeat between `take_turn`'s GO and the DONE it
waits for, and does nothing else once it has said READY, so it never overlaps the
driver's own timed runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

from .machine import wait_for_idle

T = TypeVar("T")


class PacedPeer:
    """A peer engine's driver script in paced mode (see benchmarks/peers/vllm_offline.py):
    it prints `READY name i` before each timed repeat, waits for `GO`, then prints
    `DONE name i`, and at the end `RESULT {json}`.

    Every line the peer prints goes to `log`; any failure (exit, timeout, an unexpected
    line) raises RuntimeError with the log's tail.
    """

    def __init__(self, command: list[str], job: dict, env: dict[str, str],
                 timeout_s: float, log: Path) -> None:
        self.job_path = log.with_suffix(".job.json")
        self.job_path.write_text(json.dumps(job))
        self.log, self.lines = log.open("w"), queue.Queue()
        self.deadline = time.monotonic() + timeout_s
        self.proc = subprocess.Popen([*command, str(self.job_path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, **env})
        self.tail: list[str] = []
        self.waiting: str | None = None              # the READY line last received
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            self.tail = (self.tail + [line.rstrip()])[-15:]
            if line.startswith(("READY ", "DONE ", "RESULT ")):
                self.lines.put(line.strip())
        self.lines.put(None)                          # end of output: the peer exited

    def expect(self, prefix: str) -> str:
        """The peer's next protocol line, which must start with `prefix`."""
        try:
            line = self.lines.get(timeout=max(0.0, self.deadline - time.monotonic()))
        except queue.Empty:
            line = "(timed out)"
        if line is None or not line.startswith(prefix):
            tail = "\n".join(self.tail)
            raise RuntimeError(f"paced peer: expected {prefix!r}, got {line!r}:\n{tail}")
        return line

    def ready(self, label: str) -> None:
        """Wait until the peer is ready for its timed repeat `label` ("workload i")."""
        if self.waiting != f"READY {label}":
            self.waiting = self.expect(f"READY {label}")

    def pair(self, workload: str, i: int, idle: float, mine: Callable[[], T]) -> T:
        """The i-th pair of timed runs: `mine()` (the driver's own), and the peer's i-th
        repeat of `workload`; the driver's first on even i, the peer's first on odd i, so
        that neither engine always runs right after the other. Returns mine()'s result."""
        label = f"{workload} {i}"
        self.ready(label)                 # the peer is warm and waiting: nothing runs
        if i % 2:
            self.take_turn(label, idle)
        result = mine()
        if not i % 2:
            self.take_turn(label, idle)
        return result

    def take_turn(self, label: str, idle: float) -> None:
        """Let the peer run its timed repeat `label` ("workload i") and wait for it."""
        self.ready(label)
        if idle:
            wait_for_idle(timeout_s=idle)
        self.waiting = None
        self.proc.stdin.write("GO\n")
        self.proc.stdin.flush()
        self.expect(f"DONE {label}")

    def result(self) -> dict:
        return json.loads(self.expect("RESULT ")[len("RESULT "):])

    def __enter__(self) -> "PacedPeer":
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()                   # a waiting peer reads EOF and exits
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.job_path.unlink(missing_ok=True)
