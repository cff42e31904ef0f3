"""What the decode step in one call is worth (minipaged/models/fused_decode.py): the same
engine, the same prompts, with each pure decode step run as one C call ("fused") and with
its decode steps run by the model's Python forward ("python", MINIPAGED_FUSED_DECODE=0).

The two modes take turns on one warm LLM (the i-th run of each one right after the
other, in alternate order, each after a wait for idle cores): the machine's speed drifts
by 5-10 % within minutes, more than the difference being measured, so only runs next to
each other are compared. Each run is timed whole, and so are the model's forwards of its
pure decode steps, the part the fused step replaces. Workloads and sampling are the
throughput benchmark's (benchmarks/workload.py: 64 prompts, 128 greedy tokens).

    python -m benchmarks.fused_decode            # -> docs/results/fused_decode.{csv,png,md}
    python -m benchmarks.fused_decode --smoke --out /tmp/f   # tiny random model, seconds

Invariant: both modes must generate the same tokens (checked; the fused step is bit for
bit the Python forward), so their times count the same work. On the smoke model, whose
random weights have no exact 4-bit form, the fused step never applies (`fused_steps` 0).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from minipaged.models.fused_decode import SWITCH

from .common import (add_common_args, command_line, format_table, markdown_table, out_dir,
                     pyplot, write_csv, write_markdown)
from .engines import env_set
from .machine import machine_line, wait_for_idle
from .workload import (MAX_MODEL_LEN, add_workload_args, ensure_hf_dir, make_prompts,
                       smoke_model, smoke_workloads)

MODES = {"fused": "1", "python": "0"}


def timed_turn(llm, prompts, params, mode: str, idle: float) -> tuple[dict, list]:
    """One generate in `mode`: its wall time, and the time of its decode-step forwards."""
    model = llm.llm_engine.executor.model
    forward, spent = model.forward, [0.0]

    def timed_forward(input_ids, positions, kv_caches, meta, backend, **kwargs):
        t0 = time.perf_counter()
        try:
            return forward(input_ids, positions, kv_caches, meta, backend, **kwargs)
        finally:
            if meta.is_decode:
                spent[0] += time.perf_counter() - t0

    before = model.fused_decode.steps_run
    with env_set(SWITCH, MODES[mode]):
        if idle:
            wait_for_idle(timeout_s=idle)
        model.forward = timed_forward            # an instance attribute shadows the method
        try:
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t0
        finally:
            del model.forward
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return (dict(mode=mode, wall_s=round(wall, 3), decode_forward_s=round(spent[0], 3),
                 tokens_per_s=round(tokens / wall, 1),
                 fused_steps=model.fused_decode.steps_run - before),
            [list(o.outputs[0].token_ids) for o in outs])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    add_workload_args(parser)
    parser.add_argument("--repeats", type=int, default=4, help="turns of each mode")
    args = parser.parse_args(argv)
    out = out_dir(args, "fused_decode")
    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    if args.smoke:
        model_dir = smoke_model(Path(tempfile.mkdtemp(prefix="fused-decode-model-")))
        workloads, repeats, idle = smoke_workloads(6, 8), 2, 0.0
    else:
        from transformers import AutoTokenizer

        model_dir = ensure_hf_dir()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        workloads = [make_prompts(tokenizer, name, args.num_prompts, args.max_tokens)
                     for name in args.workloads.split(",")]
        repeats, idle = args.repeats, args.idle_timeout
    from minipaged import LLM, SamplingParams

    llm = LLM(model=str(model_dir), max_model_len=MAX_MODEL_LEN, seed=0,
              enable_prefix_caching=False)
    rows, summary = [], []
    for w in workloads:
        print(f"{w.name} ...", flush=True)
        params = SamplingParams(temperature=0.0, max_tokens=w.max_tokens, ignore_eos=True)
        llm.generate(w.prompts, params, use_tqdm=False)                # warm-up, untimed
        outputs: dict[str, list] = {}
        for i in range(repeats):
            for mode in (("fused", "python") if i % 2 == 0 else ("python", "fused")):
                row, outputs[mode] = timed_turn(llm, w.prompts, params, mode, idle)
                rows.append(dict(workload=w.name, turn=i, **row))
        if outputs["fused"] != outputs["python"]:
            raise RuntimeError(f"{w.name}: the two modes generated different tokens")
        summary.append(summarise(w.name, [r for r in rows if r["workload"] == w.name]))
    report(rows, summary, args, argv, out)
    return 0


def summarise(workload: str, rows: list[dict]) -> dict:
    """Best of each mode, and the median over turns of python's time / fused's."""
    by = {m: sorted((r for r in rows if r["mode"] == m), key=lambda r: r["turn"])
          for m in MODES}
    pairs = [p["wall_s"] / f["wall_s"] for f, p in zip(by["fused"], by["python"])]
    decode = [p["decode_forward_s"] / max(f["decode_forward_s"], 1e-9)
              for f, p in zip(by["fused"], by["python"])]
    best = {m: min(r["wall_s"] for r in by[m]) for m in MODES}
    return dict(workload=workload, fused_best_s=best["fused"], python_best_s=best["python"],
                best_ratio=round(best["python"] / best["fused"], 3),
                turn_ratios=" ".join(f"{x:.3f}" for x in pairs),
                median_turn_ratio=round(statistics.median(pairs), 3),
                median_decode_forward_ratio=round(statistics.median(decode), 3),
                fused_steps=by["fused"][0]["fused_steps"])


def report(rows: list[dict], summary: list[dict], args, argv, out: Path) -> None:
    cols = ["workload", "turn", "mode", "wall_s", "decode_forward_s", "tokens_per_s",
            "fused_steps"]
    sum_cols = ["workload", "fused_best_s", "python_best_s", "best_ratio", "turn_ratios",
                "median_turn_ratio", "median_decode_forward_ratio", "fused_steps"]
    print(format_table(rows, cols))
    print(format_table(summary, sum_cols))
    write_csv(rows, out / "fused_decode.csv")
    plot(rows, out / "fused_decode.png")
    model = "a tiny random LLaMA (smoke)" if args.smoke else "SmolLM2-135M-Instruct"
    notes = [
        f"model: {model}, float32, {args.threads} torch threads; the throughput benchmark's "
        "workloads (64 prompts, 128 greedy tokens, ignore_eos, prefix caching off)",
        "fused: each pure decode step one C call (the default); python: the model's Python "
        f"forward ({SWITCH}=0); the modes take turns on one warm engine, in alternate order",
        "ratios are python's seconds / fused's (above 1: the fused step is faster); "
        "decode_forward_s: the model's forwards of the run's pure decode steps",
    ]
    tables = [markdown_table(summary, sum_cols, {
                  "fused_best_s": "fused, best s", "python_best_s": "python, best s",
                  "best_ratio": "best ÷ best", "turn_ratios": "each turn",
                  "median_turn_ratio": "median turn",
                  "median_decode_forward_ratio": "median turn, decode forwards",
                  "fused_steps": "fused steps per run"}),
              markdown_table(rows, cols)]
    write_markdown(out / "fused_decode.md", command_line("fused_decode", argv), notes, tables)
    print(f"wrote {out / 'fused_decode.csv'}, {out / 'fused_decode.png'}, "
          f"{out / 'fused_decode.md'}")


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    names = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for offset, (mode, color) in zip((-0.2, 0.2), (("fused", "tab:green"),
                                                       ("python", "tab:orange"))):
            mine = sorted((r for r in rows if r["workload"] == name and r["mode"] == mode),
                          key=lambda r: r["turn"])
            ax.bar([r["turn"] + offset for r in mine], [r["wall_s"] for r in mine], 0.4,
                   color=color, label=f"{mode}: whole run")
            ax.bar([r["turn"] + offset for r in mine], [r["decode_forward_s"] for r in mine],
                   0.4, color="none", edgecolor="k", hatch="//",
                   label="of which decode forwards" if mode == "fused" else None)
        ax.set_xlabel("turn")
        ax.set_ylabel("seconds")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
