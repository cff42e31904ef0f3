"""Where the time of a real generate goes (issue 8 item 4: what is left outside the
matrix products, and how fast the products themselves run inside a step).

The real SmolLM2-135M-Instruct generates 128 greedy tokens for each of the 64 prompts of
each throughput workload (benchmarks/workload.py), once untimed to warm up and once with
every part of the engine timed in place (the fused decode step off):

- the parts: the layers' matrix products, the LM head, decode and prompt attention, the
  KV cache writes, the norms, rotary embeddings, the MLP's SiLU x up, the sampler, the
  scheduler, the engine's own bookkeeping, the Python glue of the model, and the
  generate loop outside the steps. Times are exclusive (a part's time leaves out the
  parts it calls), so the parts add up to the run's wall time.
- the run again as minipaged runs by default, with the fused decode step on (each pure
  decode step one C call, where the parts cannot be told apart), timed whole.
- the products: for each projection and row count, the GFLOP/s it reached in the run
  ("in situ": its weights come from memory, the step before having streamed everything
  else through the caches) against the same product repeated on its own ("warm": its
  weights stay in the caches), both as shares of the machine's fp32 matmul peak measured
  in the same run. The gap is what memory costs the products in a real step.

    python -m benchmarks.profile            # -> docs/results/profile.{csv,png,md}
    python -m benchmarks.profile --smoke --out /tmp/p   # tiny random model, seconds

Invariant: the timers (benchmarks/part_timer.py) wrap the engine's own objects for the
timed run only and are removed afterwards (the model, backend and engine are left as
they were). Timing adds a
few microseconds per call (~15k calls per run): well under 1 % of a run here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from minipaged.models.fused_decode import SWITCH as FUSED_SWITCH

from .common import (add_common_args, command_line, format_table, markdown_table, out_dir,
                     pyplot, write_csv, write_markdown)
from .engines import env_set
from .machine import machine_line, matmul_peak, wait_for_idle
from .part_timer import PartTimer, timed_parts
from .workload import (MAX_MODEL_LEN, add_workload_args, ensure_hf_dir, make_prompts,
                       smoke_model, smoke_workloads)

#: parts in the order of the table and the plot (the last two are what is left)
PARTS = ("layer products", "LM head", "decode attention", "prompt attention",
         "KV cache writes", "norms", "rotary", "SiLU x up", "sampler", "scheduler",
         "engine bookkeeping", "model glue", "generate loop")
#: step order; lm_head_greedy: the greedy rows' token through the bf16 screen (greedy_head.py)
PRODUCTS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head", "lm_head_greedy")
PROMPT_ROWS = 256           # a product with more rows than this belongs to a prompt step
FUSED_RUN = "whole run, fused decode step on"


def product(llm, name: str) -> tuple[Callable, int, int]:
    """(the product's function, in_features, out_features): the first layer's projection
    of that name, or the LM head."""
    model = llm.llm_engine.executor.model
    if name in ("lm_head", "lm_head_greedy"):
        fn = model.compute_logits if name == "lm_head" else model.greedy_tokens
        return fn, model.config.hidden_size, model.config.vocab_size
    module = next(m for n, m in model.named_modules() if n.endswith("." + name))
    return module.forward, module.weight.shape[1], module.weight.shape[0]


def warm_seconds(fn: Callable, rows: int, in_features: int, repeats: int = 20) -> float:
    """Median seconds of one product repeated on its own (weights warm in the caches)."""
    x = torch.randn(rows, in_features)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            fn(x)
            if i >= 3:                               # the first calls warm up
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_workload(llm, workload) -> tuple[list[dict], list[dict]]:
    from minipaged import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=workload.max_tokens, ignore_eos=True)
    timer = PartTimer()
    # the fused decode step runs a whole step in one C call, where no part can be timed:
    # the parts are timed with it off, and the run with it on is timed whole, after
    with env_set(FUSED_SWITCH, "0"):
        llm.generate(workload.prompts, params, use_tqdm=False)          # warm-up, untimed
        with timed_parts(llm, timer):
            t0 = time.perf_counter()
            llm.generate(workload.prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.generate(workload.prompts, params, use_tqdm=False)
    fused_wall = time.perf_counter() - t0
    timer.seconds["generate loop"] = wall - sum(timer.seconds.values())
    timer.calls["generate loop"] = 1
    parts = [dict(workload=workload.name, part=p, seconds=round(timer.seconds[p], 3),
                  share_pct=round(100 * timer.seconds[p] / wall, 1), calls=timer.calls[p])
             for p in PARTS]
    parts.append(dict(workload=workload.name, part="whole run", seconds=round(wall, 3),
                      share_pct=100.0, calls=""))
    parts.append(dict(workload=workload.name, part=FUSED_RUN, seconds=round(fused_wall, 3),
                      share_pct=round(100 * fused_wall / wall, 1), calls=""))
    # per projection: the decode row count that took most time, and the prompt one
    chosen: dict[tuple[str, bool], tuple[int, list[float]]] = {}
    for (name, rows), times in timer.products.items():
        key = (name, rows > PROMPT_ROWS)
        if key not in chosen or sum(times) > sum(chosen[key][1]):
            chosen[key] = (rows, times)
    products = []
    order = {name: i for i, name in enumerate(PRODUCTS)}
    for (name, prompt), (rows, times) in sorted(
            chosen.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], len(order)))):
        fn, in_features, out_features = product(llm, name)
        flops = 2.0 * rows * in_features * out_features
        in_situ = sum(times) / len(times)
        warm = warm_seconds(fn, rows, in_features)
        products.append(dict(
            workload=workload.name, product=name, step="prompt" if prompt else "decode",
            rows=rows, calls=len(times), in_situ_us=round(1e6 * in_situ, 1),
            warm_us=round(1e6 * warm, 1), in_situ_gflops=round(flops / in_situ / 1e9, 1),
            warm_gflops=round(flops / warm / 1e9, 1),
            lost_to_memory_s=round(sum(times) - len(times) * min(warm, in_situ), 3)))
    return parts, products


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    add_workload_args(parser)
    args = parser.parse_args(argv)
    out = out_dir(args, "profile")
    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    if args.smoke:
        model_dir = smoke_model(Path(tempfile.mkdtemp(prefix="profile-model-")))
        workloads = smoke_workloads(6, 8)
    else:
        from transformers import AutoTokenizer

        model_dir = ensure_hf_dir()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        workloads = [make_prompts(tokenizer, name, args.num_prompts, args.max_tokens)
                     for name in args.workloads.split(",")]
    from minipaged import LLM

    if not args.smoke:
        wait_for_idle(timeout_s=args.idle_timeout)
    peak = matmul_peak(args.threads)
    # as in the throughput benchmark: prefix caching off, so the timed run prefills
    llm = LLM(model=str(model_dir), max_model_len=MAX_MODEL_LEN, seed=0,
              enable_prefix_caching=False)
    parts, products = [], []
    for w in workloads:
        if not args.smoke:
            wait_for_idle(timeout_s=args.idle_timeout)
        print(f"{w.name} ...", flush=True)
        p, q = profile_workload(llm, w)
        parts += p
        products += q
    # the peak again, after: a shared machine's speed drifts, and a share of the peak
    # must not exceed 1 because the first measurement met a slow moment
    peak = max(peak, matmul_peak(args.threads))
    print(f"fp32 matmul peak on {args.threads} threads: {peak:.1f} GFLOP/s", flush=True)
    for q in products:
        q["in_situ_peak_share"] = round(q["in_situ_gflops"] / peak, 3)
        q["warm_peak_share"] = round(q["warm_gflops"] / peak, 3)
    report(parts, products, peak, args, argv, out)
    return 0


def report(parts: list[dict], products: list[dict], peak: float, args, argv,
           out: Path) -> None:
    part_cols = ["workload", "part", "seconds", "share_pct", "calls"]
    product_cols = ["workload", "product", "step", "rows", "calls", "in_situ_us", "warm_us",
                    "in_situ_gflops", "warm_gflops", "in_situ_peak_share",
                    "warm_peak_share", "lost_to_memory_s"]
    print(format_table(parts, part_cols))
    print(format_table(products, product_cols))
    write_csv(parts, out / "profile.csv")
    write_csv(products, out / "profile_products.csv")
    plot(parts, products, peak, out / "profile.png")
    model = "a tiny random LLaMA (smoke)" if args.smoke else "SmolLM2-135M-Instruct"
    notes = [
        f"model: {model}, float32, "
        f"{args.threads} torch threads; the workloads, prompts and sampling of "
        "`python -m benchmarks.throughput` (64 prompts, 128 greedy tokens, ignore_eos, "
        "prefix caching off); one untimed run, then one timed run per workload, both with "
        f"the fused decode step off ({FUSED_SWITCH}=0: it runs a whole decode step in one C "
        f"call, inside which no part can be timed); then one run with it on, as minipaged "
        f"runs by default, timed whole ('{FUSED_RUN}', its share relative to the timed run)",
        f"fp32 matmul peak measured in this run: {peak:.1f} GFLOP/s (as in the throughput "
        "benchmark; the higher of a measurement before and one after the runs)",
        "parts: exclusive wall time (a part's time leaves out the parts it calls); "
        "'model glue' is the Python of the model, its layers and the attention backend "
        "between the timed ops; 'generate loop' is LLM.generate outside the engine steps",
        "products: per projection, the decode-sized row count (at most 256 rows) that took "
        "the most time, and likewise the prompt-sized one; in situ = mean over the run's calls; warm = median of 20 "
        "repeats of the same product alone, weights in the caches; lost_to_memory_s = "
        "the run's time in that product beyond what the warm rate would take",
        "lm_head_greedy: the LM head of the greedy rows, which asks only for each row's "
        "argmax (minipaged/models/greedy_head.py: a bf16 product, then float32 for the few "
        "tokens its error bound cannot rule out); its GFLOP/s count the float32 product it "
        "stands for, so its share of the fp32 peak can pass 1; the sampler is not called "
        "for such rows",
    ]
    tables = [markdown_table(parts, part_cols, {"share_pct": "share of the run (%)"}),
              markdown_table(products, product_cols, {
                  "in_situ_us": "in situ µs/call", "warm_us": "warm µs/call",
                  "in_situ_gflops": "in situ GFLOP/s", "warm_gflops": "warm GFLOP/s",
                  "in_situ_peak_share": "in situ ÷ peak", "warm_peak_share": "warm ÷ peak",
                  "lost_to_memory_s": "s lost in the run"})]
    write_markdown(out / "profile.md", command_line("profile", argv), notes, tables)
    print(f"wrote {out / 'profile.csv'}, {out / 'profile_products.csv'}, "
          f"{out / 'profile.png'}, {out / 'profile.md'}")


def plot(parts: list[dict], products: list[dict], peak: float, path: Path) -> None:
    plt = pyplot()
    names = list(dict.fromkeys(r["workload"] for r in parts))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab20").colors
    for i, name in enumerate(names):
        start = 0.0
        for j, part in enumerate(PARTS):
            share = next(r["share_pct"] for r in parts
                         if r["workload"] == name and r["part"] == part)
            left.barh(i, share, left=start, color=colors[j % len(colors)],
                      label=part if i == 0 else None)
            if share >= 5:
                left.text(start + share / 2, i, f"{share:.0f}", ha="center", va="center",
                          fontsize=8)
            start += share
    left.set_yticks(range(len(names)), names)
    left.set_xlabel("share of the run's wall time (%)")
    left.set_xlim(0, 100)
    left.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    left.set_title("where a generate's time goes")
    decode = [r for r in products if r["step"] == "decode" and r["workload"] == names[-1]]
    xs = range(len(decode))
    right.bar([x - 0.2 for x in xs], [r["warm_gflops"] for r in decode], 0.4,
              label="warm (weights in the caches)", color="tab:green")
    right.bar([x + 0.2 for x in xs], [r["in_situ_gflops"] for r in decode], 0.4,
              label="in situ (in the run)", color="tab:orange")
    right.axhline(peak, color="k", linestyle="--", linewidth=1, label="matmul peak")
    right.set_xticks(list(xs), [f"{r['product']}\n{r['rows']} rows" for r in decode],
                     fontsize=8)
    right.set_ylabel("GFLOP/s")
    right.set_ylim(0, peak * 1.35)             # room for the legend above the peak line
    right.set_title(f"decode-step products ({names[-1]})")
    right.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
