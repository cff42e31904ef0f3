"""The online-serving benchmark's knees and plot (benchmarks/serving.py runs it).

The knee of a system's curve is the last request rate before its normalised latency
first exceeds KNEE_FACTOR x the best unloaded (lowest-rate) latency of all systems.
Invariant: nothing here measures; it reads the rows the run made.
"""

from __future__ import annotations

from pathlib import Path

from .common import pyplot

KNEE_FACTOR = 2.0


def knee(points: list[dict], baseline: float | None = None) -> float | None:
    """The last rate before the first one whose normalised latency exceeds KNEE_FACTOR x
    `baseline` (default: this curve's lowest-rate latency; the benchmark passes the best
    lowest-rate latency of all systems, so every knee is measured against the same
    unloaded latency). None: even the lowest rate is past it."""
    points = sorted(points, key=lambda p: p["rate"])
    if not points:
        return None
    base = points[0]["normalized_latency"] if baseline is None else baseline
    last = None
    for p in points:
        if p["normalized_latency"] > KNEE_FACTOR * base:
            break
        last = p["rate"]
    return last


def add_knees(rows: list[dict]) -> tuple[list[dict], dict, str]:
    """Each system's knee against the best lowest-rate latency of all systems."""
    systems = list(dict.fromkeys(r["system"] for r in rows))
    lowest = [min((r for r in rows if r["system"] == s), key=lambda r: r["rate"])
              for s in systems]
    baseline = min((r["normalized_latency"] for r in lowest), default=None)
    knees = {s: knee([r for r in rows if r["system"] == s], baseline) for s in systems}
    for r in rows:
        r["knee_rate"] = knees[r["system"]] if knees[r["system"]] is not None else "below range"
    line = (f"knees (last rate before normalised latency first exceeds {KNEE_FACTOR:g}x "
            f"{baseline if baseline is None else round(baseline, 4)} s/token, the best "
            "unloaded latency of all systems): "
            + "; ".join(f"{s}: {_knee_words(k, [r['rate'] for r in rows if r['system'] == s])}"
                        for s, k in knees.items()))
    return rows, knees, line


def _knee_words(knee_rate: float | None, rates: list[float]) -> str:
    if knee_rate is None:
        return "below the lowest rate"
    if knee_rate == max(rates):
        return f"not reached (at least {knee_rate:g} req/s, the highest rate tried)"
    return f"{knee_rate:g} req/s"


def plot(rows: list[dict], knees: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["rate"])
        line, = ax.plot([r["rate"] for r in mine], [r["normalized_latency"] for r in mine],
                        "-o", label=system)
        if knees.get(system) is not None:
            ax.axvline(knees[system], color=line.get_color(), ls=":", alpha=0.6)
    ax.set_xlabel("request rate (requests/s)")
    ax.set_ylabel("normalised latency (s/token)")
    ax.set_yscale("log")
    ax.set_title("Online serving, SmolLM2-135M fp32 on this CPU (dotted: knees)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
