"""The main job of `make demo`: a real LLaMA answers a batch of prompts through the paged KV cache.

SmolLM2-135M-Instruct (the embedded default model) runs a handful of chat prompts with
continuous batching; then the demo prints each answer and a KV-cache report read from
the engine itself: blocks in use, the prefix-cache hit rate (the prompts share the
chat template's system prompt), preemptions and copy-on-write copies (one request asks
for n = 3 parallel samples, which share its prompt blocks — paper section 4.4).

Invariant: when the demo ends every KV block is free again; it says so, from the
block manager's own count.
"""

from __future__ import annotations

import argparse
import sys
import time

PROMPTS = [
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "Give me three names for a friendly robot.",
    "What is 12 times 12?",
    "Write a haiku about memory.",
    "Which planet is closest to the sun?",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minipaged.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--num-gpu-blocks", type=int, default=256)
    args = parser.parse_args(argv)

    from minipaged import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=args.model, num_gpu_blocks=args.num_gpu_blocks, block_size=16)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s; KV cache: "
          f"{args.num_gpu_blocks} blocks of 16 tokens\n", file=sys.stderr)

    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    creative = SamplingParams(n=3, temperature=0.8, top_p=0.95, seed=0,
                              max_tokens=args.max_tokens // 2)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    start = time.perf_counter()
    outputs = llm.chat(conversations, [greedy] * (len(PROMPTS) - 1) + [creative])
    elapsed = time.perf_counter() - start

    generated = 0
    for prompt, out in zip(PROMPTS, outputs):
        print(f"Q: {prompt}")
        for c in out.outputs:
            generated += len(c.token_ids)
            tag = f"A{c.index + 1}" if len(out.outputs) > 1 else "A"
            print(f"{tag}: {c.text.strip()}   [{c.finish_reason}]")
        print()

    stats = llm.stats()
    print("KV-cache report")
    print(f"  generated tokens        {generated} in {elapsed:.1f} s "
          f"({generated / elapsed:.1f} tokens/s on this machine)")
    print(f"  blocks                  {stats['num_gpu_blocks']} of {stats['block_size']} tokens")
    print(f"  prefix-cache hit rate   {stats['prefix_cache_hit_rate']:.0%} "
          f"({stats['prefix_cache_hits']} of {stats['prefix_cache_queries']} full prompt blocks)")
    print(f"  copy-on-write copies    {stats['num_cow_copies']}")
    print(f"  preemptions             {stats['num_preemptions']} "
          f"(swap {stats['num_swap_preemptions']}, recompute "
          f"{stats['num_recompute_preemptions']})")
    free = stats["num_free_blocks"] == stats["num_gpu_blocks"]
    print(f"  free blocks at the end  {stats['num_free_blocks']} / {stats['num_gpu_blocks']}"
          f"  {'(all returned)' if free else '(LEAK!)'}")
    return 0 if free else 1


if __name__ == "__main__":
    raise SystemExit(main())
