"""The `minipaged` command: generate, chat, serve and bench on the paged engine.

    minipaged generate "The capital of France is" --max-tokens 16 --temperature 0
    minipaged chat --system "You are terse."
    minipaged serve --port 8000 --num-gpu-blocks 512
    minipaged bench --list            minipaged bench memory --smoke

Every command that runs the model takes the same engine options (the knobs of
`LLM(...)`: block size, KV-cache size, swap space, prefix caching, preemption mode,
batch limits, attention backend, device, dtype, seed); generate and chat add the
sampling options of `SamplingParams`.

Invariant: a bad option value exits with status 2 and the ValueError's message (which
names the option) on stderr, before any weight is loaded; a model that cannot be loaded
exits with status 1 and a one-line message. Neither prints a traceback. Heavy imports
(torch, the engine, the server) happen only once a command runs, so `--help` is quick.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from minipaged.entrypoints.bench import cmd_bench

PROG = "minipaged"
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
               "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
               "tib": 2**40}


class UsageError(Exception):
    """A bad option value: exit status 2."""


class CommandError(Exception):
    """The command failed after its options were accepted (a model that does not load,
    a prompt the engine rejects): exit status 1."""


def parse_size(text: str) -> int:
    """Bytes from '1073741824', '512MiB', '2GB', '1.5GiB' (argparse type)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512MiB, 2GB, 1048576)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


# ---- options ---------------------------------------------------------------------------------

def engine_options() -> argparse.ArgumentParser:
    """The engine options every model-running command shares (None = EngineConfig default)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("engine options")
    g.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m), a .gguf file or a Hugging Face "
                        "checkpoint directory (default: %(default)s)")
    g.add_argument("--block-size", type=int, help="tokens per KV block (default 16)")
    g.add_argument("--num-gpu-blocks", type=int,
                   help="KV blocks on the device (default: from --kv-cache-memory)")
    g.add_argument("--kv-cache-memory", type=parse_size,
                   help="device bytes for the KV cache, e.g. 512MiB (default 1GiB)")
    g.add_argument("--swap-space", type=parse_size,
                   help="host bytes for swapped-out blocks, e.g. 1GiB, 0 for none "
                        "(default 1GiB; a bare number is bytes)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   default=None, help="do not share the KV blocks of common prompt prefixes")
    g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false",
                   default=None, help="schedule each prompt in one piece")
    g.add_argument("--preemption-mode", help="recompute (default) or swap")
    g.add_argument("--max-num-seqs", type=int, help="sequences per step at most (default 256)")
    g.add_argument("--max-num-batched-tokens", type=int,
                   help="tokens per step at most (default: max(2048, max-model-len))")
    g.add_argument("--max-model-len", type=int,
                   help="context length (default: the model's)")
    g.add_argument("--attention-backend", help="auto (default), torch, triton or numpy")
    g.add_argument("--device", help="auto (default), cpu or cuda[:N]")
    g.add_argument("--dtype", help="auto (default), float32, float16 or bfloat16")
    g.add_argument("--seed", type=int, help="seed of the engine's sampler (default 0)")
    return p


_ENGINE_KEYS = ("model", "block_size", "num_gpu_blocks", "kv_cache_memory", "swap_space",
                "enable_prefix_caching", "enable_chunked_prefill", "preemption_mode",
                "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                "attention_backend", "device", "dtype", "seed")


def sampling_options(max_tokens: int, temperature: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("sampling options")
    g.add_argument("--max-tokens", type=int, default=max_tokens,
                   help="tokens to generate at most (default %(default)s)")
    g.add_argument("--temperature", type=float, default=temperature,
                   help="0 = greedy (default %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1, help="-1 = off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", help="a stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--sampling-seed", type=int,
                   help="a per-request seed (the engine's --seed seeds everything else)")
    return p


def engine_config(args: argparse.Namespace):
    """EngineConfig from the options that were given; ValueError names a bad one."""
    from minipaged.config import EngineConfig

    given = {k: getattr(args, k) for k in _ENGINE_KEYS if getattr(args, k, None) is not None}
    return EngineConfig(**given)


def sampling_params(args: argparse.Namespace, **overrides: Any):
    from minipaged.sampling import SamplingParams

    fields = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, min_p=args.min_p,
                  repetition_penalty=args.repetition_penalty, stop=args.stop,
                  ignore_eos=args.ignore_eos, seed=args.sampling_seed)
    fields.update(overrides)
    return SamplingParams(**fields)


def load_llm(config):
    """The LLM of a validated config; load failures become a one-line error (exit 1)."""
    import dataclasses

    from minipaged.entrypoints.llm import LLM

    print(f"{PROG}: loading {config.model} ...", file=sys.stderr, flush=True)
    try:
        return LLM(**dataclasses.asdict(config))
    except (OSError, ValueError, RuntimeError) as e:
        raise CommandError(f"cannot load model {config.model!r}: {e}") from None


# ---- commands --------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    prompts = list(args.prompts)
    if args.prompt_file:
        fh = sys.stdin if args.prompt_file == "-" else open(args.prompt_file, encoding="utf-8")
        with fh:
            prompts += [line.rstrip("\n") for line in fh if line.strip()]
    if not prompts:
        raise UsageError("generate: give at least one PROMPT (or --prompt-file)")
    config = engine_config(args)
    params = sampling_params(args, n=args.n, logprobs=args.logprobs)
    llm = load_llm(config)
    use_tqdm = len(prompts) > 1 and not args.no_progress
    try:
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params,
                            use_tqdm=use_tqdm)
        else:
            outs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    except ValueError as e:            # e.g. a prompt longer than the model's context
        raise CommandError(str(e)) from None
    if args.json:
        print(json.dumps([output_to_json(p, o) for p, o in zip(prompts, outs)], indent=2,
                         ensure_ascii=False))
        return 0
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        for c in out.outputs:
            if len(prompts) > 1 or len(out.outputs) > 1:
                label = f"prompt {i}" + (f", completion {c.index}" if len(out.outputs) > 1 else "")
                print(f"### {label}: {prompt}")
            print(c.text)
    return 0


def output_to_json(prompt: str, out) -> dict:
    return {
        "prompt": prompt,
        "prompt_token_ids": out.prompt_token_ids,
        "num_cached_tokens": out.num_cached_tokens,
        "outputs": [{
            "index": c.index, "text": c.text, "token_ids": c.token_ids,
            "cumulative_logprob": c.cumulative_logprob, "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
            "logprobs": None if c.logprobs is None else
            [{str(t): lp for t, lp in step.items()} for step in c.logprobs],
        } for c in out.outputs],
    }


def cmd_chat(args: argparse.Namespace) -> int:
    from minipaged.entrypoints.chat import has_chat_template, run_chat

    config = engine_config(args)
    params = sampling_params(args)
    if params.n != 1 or params.use_beam_search:
        raise UsageError("chat: one answer per turn (n=1, no beam search)")
    llm = load_llm(config)
    if not has_chat_template(llm):
        raise CommandError("this model has no chat template")
    return run_chat(llm, params, system=args.system)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from minipaged.entrypoints.api_server import run_server
    from minipaged.entrypoints.async_engine import AsyncLLMEngine

    config = engine_config(args)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    # loaded on the engine's stepping thread: see AsyncLLMEngine.from_factory
    engine = AsyncLLMEngine.from_factory(lambda: load_llm(config).llm_engine)
    return run_server(engine, args.served_model_name or [config.model], host=args.host,
                      port=args.port, model_root=str(config.model), log_level=args.log_level)


# ---- parser and entry point ----------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="PagedAttention and a vLLM-style serving engine, small "
                               "enough to read.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # one parent parser per command: argparse shares a parent's actions, defaults included
    g = sub.add_parser("generate", parents=[sampling_options(64, 1.0), engine_options()],
                       help="complete prompts and print them",
                       description="Complete each PROMPT and print the completions.")
    g.add_argument("prompts", nargs="*", metavar="PROMPT")
    g.add_argument("--prompt-file", help="more prompts, one per line ('-' = stdin)")
    g.add_argument("--n", type=int, default=1, help="completions per prompt")
    g.add_argument("--logprobs", type=int, help="also return this many top logprobs per token")
    g.add_argument("--chat", action="store_true",
                   help="send each prompt as a user message through the chat template")
    g.add_argument("--json", action="store_true", help="print machine-readable JSON")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", parents=[sampling_options(256, 0.7), engine_options()],
                       help="talk to the model (streaming)",
                       description="An interactive chat; /reset forgets the conversation, "
                                   "/stats shows the KV cache, /exit (or EOF) quits.")
    c.add_argument("--system", help="a system message")
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", parents=[engine_options()], help="OpenAI-compatible HTTP server",
                       description="Serve /v1/models, /v1/completions, /v1/chat/completions, "
                                   "/health and /metrics.")
    s.add_argument("--host", default="127.0.0.1", help="(default %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="(default %(default)s)")
    s.add_argument("--served-model-name", nargs="+",
                   help="name(s) clients use for the model (default: --model)")
    s.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="run a benchmark: bench NAME [ARGS...]",
                       description="Run minipaged.benchmarks.NAME.main(ARGS); each benchmark "
                                   "takes its own options (try `minipaged bench NAME --help`).")
    b.add_argument("name", nargs="?", metavar="NAME")
    b.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS")
    b.add_argument("--list", action="store_true", help="list the benchmarks")
    b.set_defaults(func=cmd_bench)
    return parser


def _version() -> str:
    from minipaged import __version__
    return f"{PROG} {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if len(argv) >= 2 and argv[0] == "bench" and not argv[1].startswith("-"):
        # everything after the name belongs to the benchmark (its --help included)
        args = argparse.Namespace(func=cmd_bench, command="bench", list=False, name=argv[1],
                                  args=argv[2:])
    else:
        args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError) as e:
        # ValueError here is EngineConfig's or SamplingParams' verdict on an option value,
        # raised before anything is loaded; later ones are wrapped in CommandError
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except CommandError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
