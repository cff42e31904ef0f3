"""What every scheduler-level benchmark shares: the KV budget, the traces, a recording stub
model, a loop that feeds an engine on a trace's clock, and the table / CSV / markdown /
plot writers (paper section 6's set-up, scaled to a stub model). The machine's
description and load are in machine.py.

The KV budget is the paper's OPT-13B on one 40 GB A100 (section 6.1, Fig. 1): about
12 GiB left for the KV cache after the 26 GB of weights, at 800 KiB per token (2 (K, V)
x 40 layers x 5120 hidden x 2 bytes), so 15 728 token slots; rounded down to a multiple
of 32 so that block sizes 8, 16 and 32 all get exactly the same memory: 15 712 slots.
With Orca (Max) reserving the 2048-token context per request, that budget holds 7
requests — the paper's batch of 7 for Orca (Max) on OPT-13B.

Invariant to keep in mind: nothing here changes what it measures. The stub executors
compute no attention; they only record what the engine asked of them, at the moment the
batch would run (after the scheduler's allocations and copy-on-writes).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minipaged.config import EngineConfig
from minipaged.core.report import live_seq_ids
from minipaged.core.trace import Request, make_trace
from minipaged.engine import LLMEngine
from minipaged.model_executor.executor import StubExecutor
from minipaged.model_executor.model_runner import ModelOutput
from minipaged.sampling import SamplingParams

from .machine import machine_line

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"

#: OPT-13B's KV bytes per token: 2 (K and V) x 40 layers x 5120 hidden x 2 bytes (fp16)
OPT13B_KV_BYTES_PER_TOKEN = 2 * 40 * 5120 * 2
#: KV memory left on a 40 GB A100 after OPT-13B's 26 GB of weights (paper Fig. 1: ~12 GB)
OPT13B_KV_BYTES = 12 << 30
#: the budget in token slots, a multiple of 32 so block sizes 8, 16, 32 get the same memory
KV_BUDGET_TOKENS = OPT13B_KV_BYTES // OPT13B_KV_BYTES_PER_TOKEN // 32 * 32
MAX_LEN = 2048          # OPT's context: traces are capped here, Orca (Max) reserves it
TRACE_SEED = 0
STEP_SECONDS = 0.05     # simulated time of one engine iteration (for Poisson arrivals)
BUDGET_NOTE = (f"KV budget {KV_BUDGET_TOKENS} token slots (OPT-13B on a 40 GB A100: 12 GiB "
               f"of KV at {OPT13B_KV_BYTES_PER_TOKEN // 1024} KiB/token), context {MAX_LEN}")
TRACE_NOTE = ("traces: minipaged.core.trace.make_trace, log-normal lengths fitted to the paper's "
              "Fig. 11 means (Alpaca 19.3 in / 58.5 out, sigma 0.6; ShareGPT 161.3 / 338.0, "
              f"sigma 1.0), capped at the {MAX_LEN}-token context, seed {TRACE_SEED}")


# ---- traces ----------------------------------------------------------------------------

def saturating_rate(trace: list[Request], capacity_tokens: int, factor: float = 2.0,
                    step_seconds: float = STEP_SECONDS) -> float:
    """A Poisson rate (requests/s) `factor` times what paged memory of this size can serve.

    By Little's law a request holds, averaged over its life of `o` steps, p + o/2 tokens
    (p prompt tokens); so the memory serves at most capacity / E[p*o + o^2/2] requests
    per step. Twice that keeps a queue waiting, i.e. memory, not arrivals, is the limit.
    """
    p = np.array([r.prompt_len for r in trace], dtype=float)
    o = np.array([r.output_len for r in trace], dtype=float)
    per_step = capacity_tokens / float(np.mean(p * o + o * o / 2))
    return factor * per_step / step_seconds


def saturated_trace(name: str, num_requests: int, capacity_tokens: int = KV_BUDGET_TOKENS,
                    seed: int = TRACE_SEED, max_len: int = MAX_LEN) -> tuple[list[Request], float]:
    """The named trace with Poisson arrivals at `saturating_rate` (lengths do not depend on
    the rate: make_trace draws them before the arrival times). Returns (trace, rate)."""
    lengths = make_trace(name, num_requests, seed=seed, max_len=max_len)
    rate = saturating_rate(lengths, capacity_tokens)
    return make_trace(name, num_requests, seed=seed, max_len=max_len, request_rate=rate), rate


def prompt_tokens(rid: int, length: int, vocab: int) -> list[int]:
    """Distinct, deterministic placeholder prompt ids, so no two prompts share a block."""
    rng = np.random.default_rng(rid)
    return rng.integers(0, vocab, length).tolist()


# ---- stub models -------------------------------------------------------------------------

class RecordingStub(StubExecutor):
    """StubExecutor that calls `on_execute(items)` when a batch would run, and counts it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_execute: Callable[[list], None] | None = None
        self.num_batches = 0
        self.num_tokens_fed = 0

    def execute(self, items, swap_in, swap_out, copies):
        self.num_batches += 1
        self.num_tokens_fed += sum(len(it.token_ids) for it in items)
        if self.on_execute is not None:
            self.on_execute(items)
        return self._logits(items, swap_in, swap_out, copies)

    def _logits(self, items, swap_in, swap_out, copies) -> ModelOutput:
        return StubExecutor.execute(self, items, swap_in, swap_out, copies)


class HashStub(RecordingStub):
    """Varied but deterministic logits: `scale` x N(0, 1) noise seeded by a hash of
    (position, last token, salt). A toy language model whose next-token distribution
    depends on where it is and what it just said, so parallel samples and beams diverge
    as they would with a real model, run to run identically."""

    def __init__(self, *args: Any, scale: float = 2.0, salt: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scale = scale
        self.salt = salt

    def _logits(self, items, swap_in, swap_out, copies) -> ModelOutput:
        StubExecutor.execute(self, [], swap_in, swap_out, copies)   # count the block moves
        rows, tokens = [], []
        for it in items:
            if not it.needs_logits:
                continue
            pos = it.start_pos + len(it.token_ids) - 1
            digest = hashlib.blake2b(f"{self.salt}:{pos}:{it.token_ids[-1]}".encode(),
                                     digest_size=8).digest()
            rng = np.random.default_rng(int.from_bytes(digest, "little"))
            row = (rng.standard_normal(self.vocab_size) * self.scale).astype(np.float32)
            if it.argmax_only:
                tokens.append(int(np.argmax(row)))     # the first largest, as torch's
            else:
                rows.append(row)
        if not rows:
            return ModelOutput(torch.zeros((0, self.vocab_size)), tokens)
        return ModelOutput(torch.from_numpy(np.stack(rows)), tokens)


def make_engine(num_gpu_blocks: int, block_size: int = 16, *, max_model_len: int = MAX_LEN,
                num_cpu_blocks: int = 0, vocab_size: int = 512,
                executor_cls: type[RecordingStub] = RecordingStub,
                executor_kwargs: dict | None = None, **config: Any) -> LLMEngine:
    """An LLMEngine over a stub model: the real scheduler, block manager and sampler."""
    config.setdefault("enable_prefix_caching", False)
    cfg = EngineConfig(model="stub", block_size=block_size, num_gpu_blocks=num_gpu_blocks,
                       max_model_len=max_model_len, **config)
    executor = executor_cls(num_gpu_blocks, num_cpu_blocks, vocab_size=vocab_size,
                            max_model_len=max_model_len, **(executor_kwargs or {}))
    return LLMEngine(cfg, executor)


def greedy(max_tokens: int) -> SamplingParams:
    """Exactly `max_tokens` output tokens (the stub has no EOS; ignore_eos to be sure)."""
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@dataclass
class TimedRequest:
    arrival_time: float
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


def serve(engine: LLMEngine, requests: Iterable[TimedRequest], step_seconds: float = STEP_SECONDS,
          max_steps: int = 10_000_000) -> int:
    """Feed requests to the engine when the simulated clock passes their arrival time
    (one step = `step_seconds`; idle time is skipped) until all finish. Returns the steps."""
    pending = sorted(requests, key=lambda r: r.arrival_time)
    i = step = 0
    while i < len(pending) or engine.has_unfinished_requests():
        if step >= max_steps:
            raise RuntimeError(f"the engine did not finish within {max_steps} steps")
        if not engine.has_unfinished_requests():
            step = max(step, int(np.ceil(pending[i].arrival_time / step_seconds)))
        while i < len(pending) and pending[i].arrival_time <= step * step_seconds:
            r = pending[i]
            engine.add_request(r.request_id, r.prompt_token_ids, r.params)
            i += 1
        engine.step()
        step += 1
    return step


def live_tables(engine: LLMEngine) -> list[list[int]]:
    """The block tables of every sequence holding device blocks now."""
    bm = engine.block_manager
    return [bm.get_block_table(s) for s in live_seq_ids(bm)]


def blocks_with_and_without_sharing(engine: LLMEngine) -> tuple[int, int]:
    """(distinct blocks the live sequences hold, blocks they would hold unshared)."""
    tables = live_tables(engine)
    return len({b for t in tables for b in t}), sum(len(t) for t in tables)


def last_block_bound(lengths: Iterable[int], block_size: int) -> tuple[int, int]:
    """(token slots, slots of whole blocks): what paging can at best reach, since each
    sequence's last block may be only partly filled (BlockTable's invariant)."""
    tokens = slots = 0
    for n in lengths:
        tokens += n
        slots += -(-n // block_size) * block_size
    return tokens, slots



# ---- output --------------------------------------------------------------------------------

def single_threaded_torch() -> None:
    """The stub's tensors are tiny: one torch thread avoids waiting on a busy second core
    (on a shared machine a 2-thread op on a few hundred floats can take 20 ms)."""
    torch.set_num_threads(1)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny and fast (the test suite)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default docs/results; a temp dir with --smoke)")


def out_dir(args: argparse.Namespace, name: str) -> Path:
    out = args.out or (Path(tempfile.mkdtemp(prefix=f"{name}-")) if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    return out


def command_line(module: str, argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m benchmarks." + module, *args])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def markdown_table(rows: list[dict], columns: list[str] | None = None,
                   headers: dict[str, str] | None = None) -> str:
    columns = columns or list(rows[0])
    headers = headers or {}
    lines = ["| " + " | ".join(headers.get(c, c) for c in columns) + " |",
             "|" + "|".join("---:" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_markdown(path: Path, command: str, notes: list[str], tables: list[str]) -> None:
    """A small page fragment: the tables, then how they were made (for docs/results.md)."""
    body = "\n\n".join(tables)
    how = "\n".join(f"- {n}" for n in [f"command: `{command}`", f"machine: {machine_line()}",
                                       *notes])
    path.write_text(f"{body}\n\n{how}\n")


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
