"""The engines the throughput benchmark races, each behind one function with the same
shape: `run_X(..., workloads, ...) -> {workload name: run}`, where a run holds the timed
wall and CPU seconds, the other processes' cores during it and every prompt's generated
token ids (benchmarks/throughput.py compares and reports them).

- minipaged: `LLM.generate` of all prompts at once (continuous batching, paged cache);
- transformers: `generate` with static, left-padded batches, and its continuous
  batching (`generate_batch`'s manager, built and warmed up before the clock starts);
- vLLM's CPU build, in its own virtual environment (benchmarks/peers/vllm_offline.py).

Invariant: only the engine's own work is inside the clock — loading, warm-up and
start-up (reported apart) happen before it, and every engine gets the same token ids.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from .machine import OtherLoad, wait_for_idle
from .paced_peer import PacedPeer
from .workload import MAX_MODEL_LEN, PEERS_DIR, PEERS_PYTHON, Workload, run_peer


class Timed:
    """Wall and process CPU seconds of a block, and the other processes' cores during it."""

    def __enter__(self) -> "Timed":
        self.load = OtherLoad().start()
        self.c0, self.t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0
        self.other = self.load.stop()


@contextlib.contextmanager
def env_set(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration of a block (restored after)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run_minipaged(model_dir: Path, workloads: list[Workload], idle: float, repeats: int = 1,
                  turns: PacedPeer | None = None, **engine_args: Any) -> dict[str, dict]:
    """`turns`: a paced peer whose timed repeats take turns with minipaged's."""
    from minipaged import LLM, SamplingParams

    t0 = time.perf_counter()
    # Prefix caching off (in vLLM too): the prompts are distinct, and with it on every
    # timed repeat after the first would find its prompts cached and skip the prefill
    # that transformers, and the first repeat, pay in full.
    engine_args.setdefault("enable_prefix_caching", False)
    llm = LLM(model=str(model_dir), max_model_len=MAX_MODEL_LEN, seed=0, **engine_args)
    startup = time.perf_counter() - t0
    runs = {}
    for w in workloads:
        params = SamplingParams(temperature=0.0, max_tokens=w.max_tokens, ignore_eos=True)
        llm.generate(w.prompts[:2], SamplingParams(temperature=0.0, max_tokens=8,
                                                   ignore_eos=True), use_tqdm=False)
        timed: list[dict] = []
        run = functools.partial(timed_generate, llm, w.prompts, params, idle, timed)
        for i in range(repeats):
            outs = turns.pair(w.name, i, idle, run) if turns else run()
        # the fastest repeat, as for vLLM (benchmarks/peers/vllm_offline.py)
        runs[w.name] = dict(min(timed, key=lambda r: r["wall_s"]), startup_s=startup,
                            all_wall_s=[r["wall_s"] for r in timed],
                            outputs=[list(o.outputs[0].token_ids) for o in outs])
    del llm
    gc.collect()
    return runs


def timed_generate(llm, prompts: list[list[int]], params, idle: float,
                   timed: list[dict]) -> list:
    """One timed `llm.generate` of every prompt, its times appended to `timed`."""
    before = wait_for_idle(timeout_s=idle) if idle else None
    with Timed() as t:
        outs = llm.generate(prompts, params, use_tqdm=False)
    timed.append(dict(wall_s=t.wall, cpu_s=t.cpu, other_cores=t.other,
                      other_cores_before=before))
    return outs


def hf_model(model_dir: Path, attn: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn} if attn else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    model.eval()
    # ignore_eos: generate past an end-of-sequence token, as the other engines are told to
    model.generation_config.eos_token_id = None
    return model


def hf_static(model, prompts: list[list[int]], batch_size: int, max_tokens: int,
              pad_id: int) -> list[list[int]]:
    """transformers `generate`, greedy, in batches of `batch_size` prompts (left padding)."""
    outputs = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_tokens, pad_token_id=pad_id)
        outputs += out[:, width:].tolist()
    return outputs


def run_hf_static(model, workloads: list[Workload], batch_size: int, limit: int | None,
                  idle: float, pad_id: int) -> dict[str, dict]:
    runs = {}
    for w in workloads:
        prompts = w.prompts[:limit] if limit else w.prompts
        hf_static(model, prompts[:1], 1, 4, pad_id)                       # warm-up
        before = wait_for_idle(timeout_s=idle) if idle else None
        with Timed() as t:
            outs = hf_static(model, prompts, batch_size, w.max_tokens, pad_id)
        runs[w.name] = dict(wall_s=t.wall, cpu_s=t.cpu, other_cores=t.other,
                            other_cores_before=before, outputs=outs)
    return runs


def run_hf_continuous(model_dir: Path, workloads: list[Workload], idle: float
                      ) -> dict[str, dict]:
    """transformers' continuous batching: `generate_batch`'s loop, with its manager built
    (and warmed up) once per workload before the clock starts — building it allocates
    the paged cache and takes ~10 s here, start-up like vLLM's, reported apart."""
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    model = hf_model(model_dir)          # generate_batch switches it to paged attention
    runs = {}
    for w in workloads:
        config = GenerationConfig(max_new_tokens=w.max_tokens, do_sample=False,
                                  eos_token_id=None, use_cuda_graph=False)
        t0 = time.perf_counter()
        # Its KV pool would take 90 % of free memory (~18 GB here, 10 s to allocate):
        # give it room for the whole workload instead (blocks of 256 tokens per layer).
        blocks = sum(-(-(p + w.max_tokens) // 256) for p in w.prompt_lens) + 8
        manager = model.init_continuous_batching(
            generation_config=config,
            continuous_batching_config=ContinuousBatchingConfig(num_blocks=blocks),
            workload_hints=WorkloadHints(
                max_prompt_length=max(w.prompt_lens), max_generated_length=w.max_tokens,
                num_requests=len(w.prompts)))
        manager.warmup()
        manager.start()
        try:
            collect(manager, w.prompts[:2], 4)                             # warm-up
            startup = time.perf_counter() - t0
            before = wait_for_idle(timeout_s=idle) if idle else None
            with Timed() as t:
                outs = collect(manager, w.prompts, w.max_tokens)
        finally:
            manager.stop(block=True, timeout=5)
            manager.destroy()
        runs[w.name] = dict(wall_s=t.wall, cpu_s=t.cpu, other_cores=t.other,
                            other_cores_before=before, startup_s=startup, outputs=outs)
    del model
    gc.collect()
    return runs


def collect(manager, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Submit prompts to a running transformers CB manager; their tokens, in order."""
    ids = manager.add_requests(inputs=prompts, max_new_tokens=max_tokens)
    results = {}
    while len(results) < len(ids):
        r = manager.get_result(timeout=1)
        if r is not None and r.is_finished():
            results[r.request_id] = list(r.generated_tokens)
        elif r is None and not manager.is_running():
            raise RuntimeError("transformers' continuous batching thread stopped")
    return [results[i] for i in ids]


def vllm_job(model_dir: Path, workloads: list[Workload], bind: str, idle: float,
             repeats: int, paced: bool = False) -> tuple[dict, dict[str, str]]:
    """(job, environment) for benchmarks/peers/vllm_offline.py."""
    job = dict(model=str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN,
               max_tokens=workloads[0].max_tokens, idle_timeout=idle, repeats=repeats,
               enable_prefix_caching=False,         # as run_minipaged: see there
               paced=paced, workloads={w.name: w.prompts for w in workloads})
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": bind,
           "TOKENIZERS_PARALLELISM": "false"}
    return job, env


def vllm_runs(result: dict) -> dict[str, dict]:
    return {name: dict(r, startup_s=result["startup_s"], version=result["version"])
            for name, r in result["runs"].items()}


def run_vllm(model_dir: Path, workloads: list[Workload], bind: str, idle: float,
             timeout_s: float, log: Path, repeats: int = 1) -> dict[str, dict]:
    job, env = vllm_job(model_dir, workloads, bind, idle, repeats)
    return vllm_runs(run_peer("vllm_offline.py", job, env, timeout_s, log=log))


def run_interleaved(model_dir: Path, workloads: list[Workload], bind: str, idle: float,
                    timeout_s: float, log: Path, repeats: int
                    ) -> tuple[dict[str, dict], dict[str, dict]]:
    """(minipaged's runs, vLLM's runs), their timed repeats taking turns (`PacedPeer.pair`)
    for each workload. vLLM starts first (its ~2.5 min start-up must not overlap a timed
    run); minipaged loads while vLLM waits for its first turn."""
    job, env = vllm_job(model_dir, workloads, bind, idle, repeats, paced=True)
    with PacedPeer([str(PEERS_PYTHON), str(PEERS_DIR / "vllm_offline.py")], job, env,
                   timeout_s, log) as peer:
        peer.ready(f"{workloads[0].name} 0")
        mine = run_minipaged(model_dir, workloads, idle, repeats, turns=peer)
        return mine, vllm_runs(peer.result())
