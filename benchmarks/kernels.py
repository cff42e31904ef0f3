"""Decode-attention kernel timings on SmolLM2 shapes (paper section 4.1 / Fig. 18a's question).

The paper asks what paging costs inside the attention kernel (Fig. 18a: 20-26 % over
FasterTransformer's contiguous kernel). Here, on the CPU, the torch backend's two decode
paths, the C kernel that reads K/V inside their blocks (kernels/cpu_paged_attention.c)
and the portable block gather + SDPA, are timed against the vectorised NumPy reference
(`paged_attention_decode_vectorized`); on a GPU (`--device cuda`), the Triton
PagedAttention kernel against torch SDPA on K/V already gathered contiguously (the
"no paging" ideal) and against the torch backend (gather + SDPA).

Shapes: 9 query heads, 3 KV heads, head_dim 64, block size 16 (SmolLM2-135M), one new
token per sequence, every sequence with the same context, blocks shuffled in the pool.

    python -m benchmarks.kernels                 # CPU grid -> docs/results/kernels.{csv,png}
    python -m benchmarks.kernels --smoke --out /tmp/k
    python -m benchmarks.kernels --device cuda   # -> docs/results/kernels_cuda.{csv,png}

Invariant: every timed implementation is first checked against the first one on the same
inputs (max |difference| is written to the table), so a fast wrong kernel cannot win.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16
BATCHES = (1, 8, 32, 64)
CONTEXTS = (128, 512, 2048)
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def make_batch(batch: int, context: int, device: str, dtype: torch.dtype = torch.float32,
               seed: int = 0) -> dict:
    """A decode batch: every sequence has `context` tokens in shuffled physical blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 8                    # a few spare blocks
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    tables = torch.randperm(num_blocks, generator=gen)[:batch * blocks_per_seq]
    return dict(
        query=torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=gen).to(device, dtype),
        key_cache=torch.randn(shape, generator=gen).to(device, dtype),
        value_cache=torch.randn(shape, generator=gen).to(device, dtype),
        block_tables=tables.view(batch, blocks_per_seq).to(device, torch.int32),
        context_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        scale=HEAD_DIM ** -0.5)


def time_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None,
            budget_s: float = 3.0) -> tuple[float, float]:
    """(median wall time, median process CPU time) of fn in ms, after one warm-up call.

    The CPU time (all threads together) is what a call costs when it has the cores to
    itself: on a shared machine it is the steadier of the two for a 1-thread run.
    Stops early (after at least 3 repeats) once `budget_s` is spent, so the slow NumPy
    reference at batch 64 x 2048 does not dominate the run.
    """
    fn()
    sync()
    wall: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if len(wall) >= 3 and time.perf_counter() - start > budget_s:
            break
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def kv_bytes(batch: int, context: int, dtype: torch.dtype) -> int:
    """Bytes of K and V the batch must read at least once."""
    return 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * torch.finfo(dtype).bits // 8


def cpu_rows(shapes, repeats: int) -> list[dict]:
    from minipaged.attention.torch_backend import TorchBackend
    from minipaged.kernels import cpu_kernel
    from minipaged.kernels.reference import paged_attention_decode_vectorized

    have_c = cpu_kernel.load() is not None
    fast, gather = TorchBackend(), TorchBackend(c_kernel=False)
    rows = []
    for batch, context in shapes:
        b = make_batch(batch, context, "cpu")
        args = (b["query"], b["key_cache"], b["value_cache"], b["block_tables"],
                b["context_lens"], b["scale"])
        np_args = tuple(a.numpy() if isinstance(a, torch.Tensor) else a for a in args)
        c_fn = lambda: fast.paged_attention_decode(*args)  # noqa: E731
        gather_fn = lambda: gather.paged_attention_decode(*args)  # noqa: E731
        numpy_fn = lambda: paged_attention_decode_vectorized(*np_args)  # noqa: E731
        expected = numpy_fn()
        diff = max(float(np.abs(fn().numpy() - expected).max()) for fn in (c_fn, gather_fn))
        with torch.inference_mode():
            c_ms, c_cpu_ms = time_ms(c_fn, repeats) if have_c else (float("nan"),) * 2
            gather_ms, gather_cpu_ms = time_ms(gather_fn, repeats)
        numpy_ms, numpy_cpu_ms = time_ms(numpy_fn, repeats)
        best = c_ms if have_c else gather_ms
        rows.append(dict(device="cpu", batch=batch, context=context,
                         c_kernel_ms=round(c_ms, 3), gather_sdpa_ms=round(gather_ms, 3),
                         numpy_ms=round(numpy_ms, 3),
                         c_over_gather=round(gather_ms / c_ms, 2) if have_c else "",
                         speedup_over_numpy=round(numpy_ms / best, 1),
                         c_kernel_cpu_ms=round(c_cpu_ms, 3),
                         gather_sdpa_cpu_ms=round(gather_cpu_ms, 3),
                         numpy_cpu_ms=round(numpy_cpu_ms, 3),
                         kv_GBps=round(kv_bytes(batch, context, torch.float32)
                                       / best / 1e6, 2),
                         max_abs_diff=f"{diff:.1e}"))
        print_row(rows[-1])
    return rows


def cuda_rows(shapes, repeats: int, dtype: torch.dtype) -> list[dict]:
    import torch.nn.functional as F

    from minipaged.attention import get_attn_backend

    triton_backend = get_attn_backend("triton", "cuda")
    torch_backend = get_attn_backend("torch", "cuda")
    rows = []
    for batch, context in shapes:
        b = make_batch(batch, context, "cuda", dtype)
        args = (b["query"], b["key_cache"], b["value_cache"], b["block_tables"],
                b["context_lens"], b["scale"])
        # The "no paging" ideal: K/V already contiguous per sequence, [S, H_kv, ctx, D].
        k, v, _ = torch_backend._gather(b["key_cache"], b["value_cache"], b["block_tables"],
                                        b["context_lens"], context)
        k, v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        q = b["query"].view(batch, NUM_HEADS, 1, HEAD_DIM)
        triton_fn = lambda: triton_backend.paged_attention_decode(*args)  # noqa: E731
        torch_fn = lambda: torch_backend.paged_attention_decode(*args)  # noqa: E731
        sdpa_fn = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q, k, v, scale=b["scale"], enable_gqa=True)
        ref = sdpa_fn().view(batch, NUM_HEADS, HEAD_DIM).float()
        diff = max(float((triton_fn().float() - ref).abs().max()),
                   float((torch_fn().float() - ref).abs().max()))
        sync = torch.cuda.synchronize
        with torch.inference_mode():
            triton_ms = time_ms(triton_fn, repeats, sync)[0]
            sdpa_ms = time_ms(sdpa_fn, repeats, sync)[0]
            torch_ms = time_ms(torch_fn, repeats, sync)[0]
        rows.append(dict(device=torch.cuda.get_device_name(), batch=batch, context=context,
                         triton_ms=round(triton_ms, 4), sdpa_contiguous_ms=round(sdpa_ms, 4),
                         torch_backend_ms=round(torch_ms, 4),
                         triton_over_sdpa=round(triton_ms / sdpa_ms, 2),
                         triton_kv_GBps=round(kv_bytes(batch, context, dtype)
                                              / triton_ms / 1e6, 1),
                         max_abs_diff=f"{diff:.1e}"))
        print_row(rows[-1])
    return rows


def print_row(row: dict) -> None:
    if not getattr(print_row, "header_done", False):
        print(" | ".join(f"{k:>14}" for k in row))
        print_row.header_done = True
    print(" | ".join(f"{str(v):>14}" for v in row.values()), flush=True)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], series: dict[str, str], title: str, path: Path) -> None:
    """Latency against context length, one colour per batch size, one style per series."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ["-o", "--s", ":^"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for color, batch in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"],
                            sorted({r["batch"] for r in rows})):
        mine = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["context"])
        for style, (column, label) in zip(styles, series.items()):
            ax.plot([r["context"] for r in mine], [r[column] for r in mine], style,
                    color=color, label=f"{label}, batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode attention, one layer (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--smoke", action="store_true", help="one tiny shape, fast")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default docs/results; a temp dir with --smoke)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per point")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                        default="float16", help="cache dtype for --device cuda")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} cores")
    if args.device == "cpu" and load > 0.5:
        # Timings on a busy machine measure the scheduler: a multi-threaded op waits a
        # whole time slice (~8 ms here) whenever one of its threads is descheduled.
        print("warning: the machine is busy; multi-threaded timings will be noisy "
              "(try --threads 1, or rerun when it is idle)")
    out = args.out or (Path(tempfile.mkdtemp(prefix="kernels-")) if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    shapes = [(2, 64)] if args.smoke else [(b, c) for b in BATCHES for c in CONTEXTS]
    repeats = 3 if args.smoke else args.repeats

    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device here (torch.cuda.is_available() is False); "
                  "nothing to time.")
            return 0
        print(f"decode attention on {torch.cuda.get_device_name()}, {args.dtype}")
        rows = cuda_rows(shapes, repeats, getattr(torch, args.dtype))
        stem, title = "kernels_cuda", f"Decode attention, SmolLM2 shapes ({args.dtype}, GPU)"
        series = {"triton_ms": "Triton paged", "sdpa_contiguous_ms": "SDPA contiguous",
                  "torch_backend_ms": "torch backend"}
    else:
        print(f"decode attention on the CPU, fp32, torch threads: {torch.get_num_threads()}")
        rows = cpu_rows(shapes, repeats)
        threads = torch.get_num_threads()
        stem, title = "kernels", (f"Decode attention, SmolLM2 shapes (fp32, CPU, {threads} "
                                  f"thread{'s' if threads > 1 else ''})")
        series = {"c_kernel_ms": "C kernel (torch backend's decode)",
                  "gather_sdpa_ms": "gather + SDPA (torch, portable)",
                  "numpy_ms": "NumPy reference (vectorised)"}
    write_csv(rows, out / f"{stem}.csv")
    plot(rows, series, title, out / f"{stem}.png")
    from .common import command_line, markdown_table, write_markdown

    write_markdown(out / f"{stem}.md", command_line("kernels", argv), [
        f"load average {load:.1f} at the start; torch threads: {torch.get_num_threads()}",
        f"shapes: {NUM_HEADS} query heads, {NUM_KV_HEADS} KV heads, head_dim {HEAD_DIM}, "
        f"block size {BLOCK_SIZE}; every sequence of the batch has the same context, its "
        "blocks shuffled in the pool; one new token per sequence",
        f"times: the median of up to {repeats} calls after a warm-up (ms, one layer); "
        "*_cpu_ms: process CPU time of the same calls (all threads)",
        "max_abs_diff: the largest difference of any timed implementation from the "
        "reference on the same inputs",
        "kv_GBps: bytes of K and V the batch must read, over the fastest time"],
        [markdown_table(rows)])
    print(f"wrote {out / (stem + '.csv')}, {out / (stem + '.png')} and {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
