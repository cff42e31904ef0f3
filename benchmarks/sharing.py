"""KV blocks saved by sharing (paper section 4.4, section 6.3 Fig. 15, section 6.4).

Parallel sampling (n samples of one prompt share the prompt's blocks) and beam search
(beams share their common history, forking and freeing every step) are run through the
REAL engine on the Alpaca-shaped trace, with a toy model (`common.HashStub`: logits
`2 x N(0, 1)` seeded by a hash of position and last token) so that samples and beams
diverge as with a real model. At every step, when the batch would run (after the
scheduler's allocations and copy-on-writes), the blocks the live sequences hold are
counted twice: as they are (shared blocks once) and as if nothing were shared (each
sequence's own ``ceil(len / B)`` blocks). The saving is ``1 - shared / unshared``, the
paper's Fig. 15 measure, averaged over the steps.

The shared-prefix experiment puts one few-shot prefix (5 Alpaca-shaped examples) before
every question and serves the same requests with prefix caching off and on: prompt tokens
computed (prefill), blocks held, the saving as above, and the cache hit rate.

    python -m benchmarks.sharing            # -> docs/results/sharing.{csv,png,md}
    python -m benchmarks.sharing --smoke --out /tmp/s

Invariant: within one experiment every variant serves the same prompts, lengths and
arrival times; only the sharing differs.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from minipaged.core.trace import Request, make_trace
from minipaged.sampling import SamplingParams

from .common import (BUDGET_NOTE, KV_BUDGET_TOKENS, MAX_LEN, STEP_SECONDS, TRACE_NOTE,
                     TRACE_SEED, HashStub, TimedRequest, add_common_args,
                     blocks_with_and_without_sharing, command_line, format_table, greedy,
                     make_engine, markdown_table, out_dir, prompt_tokens, pyplot,
                     saturating_rate, saturated_trace, serve, single_threaded_torch,
                     write_csv, write_markdown)

PAPER = {"parallel sampling": (6.1, 9.8), "beam search": (37.6, 55.2)}   # section 6.3, %
WIDTHS = (2, 4, 6)
BLOCK_SIZE = 16
VOCAB = 512
LOGIT_SCALE = 2.0
NUM_REQUESTS = 400
NUM_PREFIX_REQUESTS = 400
NUM_SHOTS = 5


class StepCounter:
    """Per step: blocks held with sharing and without (see the module docstring)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.shared: list[int] = []
        self.unshared: list[int] = []
        engine.executor.on_execute = self._count

    def _count(self, items) -> None:
        used, unshared = blocks_with_and_without_sharing(self.engine)
        if unshared:
            self.shared.append(used)
            self.unshared.append(unshared)

    def summary(self) -> dict:
        shared, unshared = np.array(self.shared, float), np.array(self.unshared, float)
        return dict(saving_pct=100 * float(np.mean(1 - shared / unshared)),
                    mean_blocks_shared=float(shared.mean()),
                    mean_blocks_unshared=float(unshared.mean()),
                    peak_blocks=int(shared.max()), steps=len(shared))


def _engine(capacity: int, max_len: int, **config):
    return make_engine(capacity // BLOCK_SIZE, BLOCK_SIZE, max_model_len=max_len,
                       num_cpu_blocks=capacity // BLOCK_SIZE, vocab_size=VOCAB,
                       executor_cls=HashStub, executor_kwargs=dict(scale=LOGIT_SCALE),
                       max_num_seqs=512, **config)


def decoding_rows(trace, capacity: int, max_len: int, widths=WIDTHS) -> list[dict]:
    rows = []
    for method in ("parallel sampling", "beam search"):
        for width in widths:
            def params(i: int, out_len: int, method: str = method, width: int = width
                       ) -> SamplingParams:
                if method == "beam search":
                    return SamplingParams(n=width, use_beam_search=True, temperature=0.0,
                                          max_tokens=out_len, ignore_eos=True)
                return SamplingParams(n=width, temperature=1.0, seed=i, max_tokens=out_len,
                                      ignore_eos=True)

            t0 = time.perf_counter()
            engine = _engine(capacity, max_len)
            counter = StepCounter(engine)
            serve(engine, [TimedRequest(r.arrival_time, str(i),
                                        prompt_tokens(i, r.prompt_len, VOCAB),
                                        params(i, r.output_len)) for i, r in enumerate(trace)])
            stats = engine.stats()
            lo, hi = PAPER[method]
            rows.append(dict(experiment=method, variant=f"width {width}", **counter.summary(),
                             paper_pct=f"{lo}-{hi} (widths 2-6)",
                             cow_copies=stats["num_cow_copies"],
                             preemptions=stats["num_preemptions"],
                             seconds=round(time.perf_counter() - t0, 1)))
            print(f"  {method:17s} width {width}: saving {rows[-1]['saving_pct']:5.1f} %"
                  f"  ({rows[-1]['seconds']} s)", flush=True)
    return rows


def prefix_rows(num_requests: int, capacity: int, num_shots: int = NUM_SHOTS,
                qa_max_len: int = MAX_LEN // 2) -> tuple[list[dict], int]:
    """Few-shot prefix + Alpaca-shaped questions and answers, prefix caching off vs on."""
    max_len = MAX_LEN
    shots = make_trace("alpaca", num_shots, seed=TRACE_SEED + 1, max_len=qa_max_len)
    prefix = prompt_tokens(10**6, sum(s.final_len for s in shots), VOCAB)   # the examples
    qa = make_trace("alpaca", num_requests, seed=TRACE_SEED,
                    max_len=min(qa_max_len, max_len - len(prefix)))
    full = [Request(len(prefix) + r.prompt_len, r.output_len) for r in qa]
    rate = saturating_rate(full, capacity)
    arrivals = np.cumsum(np.random.default_rng(TRACE_SEED).exponential(1 / rate, len(qa)))
    requests = [TimedRequest(float(t), str(i), prefix + prompt_tokens(i, r.prompt_len, VOCAB),
                             greedy(r.output_len)) for i, (r, t) in enumerate(zip(qa, arrivals))]
    rows = []
    for caching in (False, True):
        t0 = time.perf_counter()
        engine = _engine(capacity, max_len, enable_prefix_caching=caching)
        counter = StepCounter(engine)
        serve(engine, requests)
        stats = engine.stats()
        prompt_total = stats["num_prompt_tokens"]
        # prompt tokens computed = all tokens fed minus the decode tokens (each output
        # token but the last is fed once); exact when nothing was preempted
        decode_fed = sum(r.params.max_tokens - 1 for r in requests)
        computed = engine.executor.num_tokens_fed - decode_fed
        variant = f"caching {'on' if caching else 'off'}"
        rows.append(dict(experiment="shared prefix", variant=variant,
                         **counter.summary(), prompt_tokens=prompt_total,
                         prefill_tokens_computed=computed,
                         prefill_saved_pct=100 * (1 - computed / prompt_total),
                         hit_rate_pct=100 * stats["prefix_cache_hit_rate"],
                         preemptions=stats["num_preemptions"],
                         seconds=round(time.perf_counter() - t0, 1)))
        print(f"  shared prefix, caching {'on ' if caching else 'off'}: saving "
              f"{rows[-1]['saving_pct']:5.1f} %, prefill {computed} of {prompt_total} tokens"
              f"  ({rows[-1]['seconds']} s)", flush=True)
    return rows, len(prefix)


def plot(rows: list[dict], path) -> None:
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (method, (lo, hi)), color in zip(PAPER.items(), ("#2a9d8f", "#e76f51")):
        mine = [r for r in rows if r["experiment"] == method]
        widths = [int(r["variant"].split()[-1]) for r in mine]
        ax.plot(widths, [r["saving_pct"] for r in mine], "o-", color=color,
                label=f"{method} (ours)")
        ax.axhspan(lo, hi, color=color, alpha=0.15, label=f"{method} (paper, widths 2-6)")
    ax.set_xlabel("n (parallel samples) or beam width")
    ax.set_ylabel("KV blocks saved by sharing (%)")
    ax.set_xticks(sorted({int(r["variant"].split()[-1]) for r in rows
                          if r["variant"].startswith("width")}))
    ax.set_ylim(bottom=0)
    ax.set_title("Parallel sampling and beam search (Alpaca-shaped)")
    ax.legend(fontsize=7)
    pre = [r for r in rows if r["experiment"] == "shared prefix"]
    x = np.arange(len(pre))
    bars = [("prompt tokens computed (% of all)",
             [100 * r["prefill_tokens_computed"] / r["prompt_tokens"] for r in pre]),
            ("KV blocks saved by sharing (%)", [r["saving_pct"] for r in pre]),
            ("prefix-cache hit rate (%)", [r["hit_rate_pct"] for r in pre])]
    for j, (label, vals) in enumerate(bars):
        xs = x + (j - 1) * 0.27
        bx.bar(xs, vals, 0.27, label=label)
        for xi, v in zip(xs, vals):
            bx.text(xi, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    bx.set_xticks(x, [r["variant"] for r in pre])
    bx.set_ylim(0, 110)
    bx.set_title("Shared few-shot prefix, prefix caching off vs on")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    single_threaded_torch()
    out = out_dir(args, "sharing")
    # smoke: a few short requests (context 128) in a small budget, widths 2 and 4
    num = 6 if args.smoke else NUM_REQUESTS
    num_prefix = 8 if args.smoke else NUM_PREFIX_REQUESTS
    capacity = 2048 if args.smoke else KV_BUDGET_TOKENS
    max_len = 128 if args.smoke else MAX_LEN
    widths = WIDTHS[:2] if args.smoke else WIDTHS
    trace, rate = saturated_trace("alpaca", num, capacity, max_len=max_len)
    print(BUDGET_NOTE if not args.smoke else f"smoke: {capacity} slots, context {max_len}")
    rows = decoding_rows(trace, capacity, max_len, widths)
    prefix, prefix_len = prefix_rows(num_prefix, capacity, *((2, 64) if args.smoke else ()))
    rows += prefix
    columns = ["experiment", "variant", "saving_pct", "paper_pct", "mean_blocks_shared",
               "mean_blocks_unshared", "peak_blocks", "prefill_tokens_computed",
               "hit_rate_pct", "preemptions"]
    print(format_table(rows, columns))
    write_csv(rows, out / "sharing.csv")
    plot(rows, out / "sharing.png")
    headers = {"saving_pct": "blocks saved %", "paper_pct": "paper %",
               "mean_blocks_shared": "mean blocks held", "mean_blocks_unshared":
               "... unshared", "peak_blocks": "peak held", "prefill_tokens_computed":
               "prompt tokens computed", "hit_rate_pct": "prefix hit rate %"}
    notes = [
        BUDGET_NOTE if not args.smoke
        else f"smoke run: {capacity} token slots, context {max_len}",
        TRACE_NOTE + f"; alpaca, {num} requests, Poisson at {rate:.1f} req/s (2x what paged "
        f"memory serves at n = 1; one step = {STEP_SECONDS} s)",
        f"engine: LLMEngine, block size {BLOCK_SIZE}, max_num_seqs 512, groups preempted by "
        f"swapping; toy model: HashStub, logits {LOGIT_SCALE} x N(0,1) seeded by (position, "
        f"last token), vocabulary {VOCAB}; parallel sampling: temperature 1, seed = request "
        "index; beam search: temperature 0, no EOS, every beam runs to the output length",
        "saving = 1 - blocks held / blocks the same sequences would hold unshared, per step "
        "(when the batch runs), averaged over the steps (paper Fig. 15's measure)",
        f"shared prefix: {2 if args.smoke else NUM_SHOTS} Alpaca-shaped examples = "
        f"{prefix_len} tokens before each of {num_prefix} Alpaca-shaped questions (same "
        "arrivals with caching off and on); "
        "hit rate = full prompt blocks found in the cache / full prompt blocks looked up",
        "paper: 6.1-9.8 % (parallel sampling) and 37.6-55.2 % (beam search) on Alpaca with "
        "OPT-13B (section 6.3); its prefix experiment (section 6.4) reports throughput, not "
        "memory",
    ]
    write_markdown(out / "sharing.md", command_line("sharing", argv), notes,
                   [markdown_table(rows, columns, headers)])
    print(f"wrote {out / 'sharing.csv'}, {out / 'sharing.png'}, {out / 'sharing.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
