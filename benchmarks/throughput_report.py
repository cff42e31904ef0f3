"""The report of benchmarks/throughput.py: its tables (printed, CSV, markdown with the
notes that say how the numbers were made) and its bar chart.

Invariant: every number here comes from the run's rows; nothing is measured here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minipaged.models.fused_decode import SWITCH as FUSED_SWITCH
from minipaged.models.greedy_head import SWITCH as SCREEN_SWITCH
from minipaged.models.packed_linear import FOUR_BIT_SWITCH

from .common import (command_line, format_table, markdown_table, pyplot, write_csv,
                     write_markdown)
from .identity import NEAR_TIE
from .workload import MAX_MODEL_LEN

F32_LABEL = "minipaged, float32 weight reads"
PYTHON_DECODE_LABEL = "minipaged, decode steps in Python"
F32_HEAD_LABEL = "minipaged, float32 LM head for greedy rows"


def report(rows, identity_rows, workloads, peak, args, argv, out, notes_skipped,
           peers_ran) -> None:
    columns = ["workload", "engine", "prompts", "tokens_per_s", "minipaged_over_this",
               "all_runs_tokens_per_s", "peak_share", "peak_share_with_prompts", "seconds",
               "cpu_s", "startup_s", "other_cores"]
    print(format_table(rows, columns))
    tables = [markdown_table(rows, columns, {
        "tokens_per_s": "generated tokens/s", "minipaged_over_this": "minipaged ÷ this",
        "all_runs_tokens_per_s": "every run (tokens/s)",
        "peak_share": "share of matmul peak", "peak_share_with_prompts":
        "… with prompt FLOPs", "seconds": "timed s", "cpu_s": "CPU s",
        "startup_s": "start-up s", "other_cores": "other processes (cores)"})]
    if identity_rows:
        id_cols = ["workload", "engine", "reference", "compared", "identical", "near_ties",
                   "other_diffs", "gaps"]
        print(format_table(identity_rows, id_cols))
        tables.append(markdown_table(identity_rows, id_cols, {
            "compared": "outputs compared", "identical": "token-identical",
            "near_ties": f"near-ties (gap < {NEAR_TIE:g})", "other_diffs": "other differences",
            "gaps": "top-2 logit gap at first difference"}))
    write_csv(rows, out / "throughput.csv")
    if identity_rows:
        write_csv(identity_rows, out / "throughput_identity.csv")
    plot(rows, out / "throughput.png", peak)
    lens = {w.name: (min(w.prompt_lens), int(np.mean(w.prompt_lens)), max(w.prompt_lens))
            for w in workloads}
    notes = [
        f"model: SmolLM2-135M-Instruct, float32 weights (dequantised Q4_1 GGUF), every "
        f"engine on the same checkpoint directory; {args.threads} torch threads",
        "minipaged finds that the float32 weights are exactly 4-bit codes and scales, and "
        "in decode-sized products reads them in that form, rebuilding the same float32 "
        "values in the caches (still float32 arithmetic on float32 weights: no "
        f"quantisation); '{F32_LABEL}' is minipaged with that off "
        f"({FOUR_BIT_SWITCH}=0), every product reading float32 weights as the peers do",
        "minipaged runs each pure decode step as one C call that calls the same kernels "
        "as its Python forward, bit for bit (minipaged/models/fused_decode.py); "
        f"'{PYTHON_DECODE_LABEL}' is minipaged with that off ({FUSED_SWITCH}=0)",
        "minipaged takes a greedy row's token from a bf16 product of the LM head with a "
        "proven error bound, rescoring in float32 the few tokens the bound cannot rule "
        "out: the float32 argmax, without the float32 logits "
        f"(minipaged/models/greedy_head.py); '{F32_HEAD_LABEL}' is minipaged with that "
        f"off ({SCREEN_SWITCH}=0)",
        "workloads: " + "; ".join(f"{k}: prompt tokens min / mean / max {a} / {b} / {c}"
                                  for k, (a, b, c) in lens.items())
        + f"; {workloads[0].max_tokens} generated tokens per prompt (greedy, ignore_eos), "
          f"max_model_len {MAX_MODEL_LEN}",
        f"fp32 matmul peak measured in this run: {peak:.1f} GFLOP/s (2048^3, the faster "
        f"of torch's MKL and oneDNN GEMMs, {args.threads} threads); share of peak = generated "
        "tokens/s x (2 x parameters + attention) FLOPs per generated token / peak; the "
        "second share also counts the prompt tokens' FLOPs",
        "transformers static batch 1 runs the first "
        f"{args.bs1_prompts} prompts only (it is slow); it is the reference for token identity",
        "peers that ran: " + (", ".join(peers_ran) if peers_ran else "none"),
        *notes_skipped,
        f"minipaged and vLLM: the fastest of {args.repeats} timed runs per workload (every "
        "run is listed; the machine is shared and a run that meets other load is slower); "
        "transformers: one run. Prefix caching is off in minipaged and vLLM, so that every "
        "repeat prefills its prompts in full, as transformers does",
        "llama.cpp is not run (PyPI has no prebuilt llama-cpp-python wheel for this "
        "machine; it would be built from source); for scale, its Q4_1 file, one prompt at "
        "a time, was measured on this kind of machine at 83 tokens/s (issue 8)",
        "other processes (cores): CPU the rest of the machine used during the timed run "
        "(from /proc/stat); a run taken while it is well above 0 is slowed down",
    ]
    write_markdown(out / "throughput.md", command_line("throughput", argv), notes, tables)
    print(f"wrote {out / 'throughput.csv'}, {out / 'throughput.png'}, {out / 'throughput.md'}")


def plot(rows: list[dict], path: Path, peak: float) -> None:
    plt = pyplot()
    names = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r["workload"] == name]
        labels = [r["engine"] for r in mine]
        values = [r["tokens_per_s"] for r in mine]
        colors = ["tab:green" if lab.startswith("minipaged") else
                  "tab:red" if lab.startswith("vLLM") else "tab:blue" for lab in labels]
        bars = ax.barh(range(len(mine)), values, color=colors)
        for bar, r in zip(bars, mine):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f" {r['tokens_per_s']:.0f} ({100 * r['peak_share']:.0f} % of peak)",
                    va="center", fontsize=8)
        ax.set_yticks(range(len(mine)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("generated tokens / s")
        ax.set_title(f"{name}-shaped prompts")
        ax.set_xlim(0, max(values) * 1.45)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"End-to-end throughput, SmolLM2-135M fp32 on this CPU "
                 f"(matmul peak {peak:.0f} GFLOP/s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
