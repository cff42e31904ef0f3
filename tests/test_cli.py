"""The `minipaged` command line, run as a subprocess the way a user runs it.

The three runs that load SmolLM2 (generate --json, generate, chat) start together in one
module fixture, so the module pays for roughly one model load in wall time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

MODEL_ARGS = ["--num-gpu-blocks", "64", "--max-model-len", "256", "--swap-space", "0"]
GREEDY = ["--temperature", "0", "--max-tokens", "6"]
QUESTION = "What is the capital of France?"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def minipaged(*args: str, stdin: str | None = None, timeout: float = 300
              ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minipaged", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "minipaged", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


@pytest.fixture(scope="module")
def model_runs():
    """The three model-loading runs, started together; name -> CompletedProcess-like."""
    procs = {
        "json": (start("generate", "The capital of France is", "Water boils at", "--json",
                       *GREEDY, *MODEL_ARGS), None),
        "plain": (start("generate", QUESTION, "--chat", *GREEDY, *MODEL_ARGS), None),
        "chat": (start("chat", *GREEDY, *MODEL_ARGS), f"{QUESTION}\n/exit\n"),
    }
    results = {}
    try:
        for name, (proc, stdin) in procs.items():
            out, err = proc.communicate(stdin, timeout=600)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.fixture(scope="module")
def tokenizer():
    from minipaged.model_executor.tokenizer import get_tokenizer
    from minipaged.model_executor.weight_loader import checkpoint_dir
    return get_tokenizer(checkpoint_dir("smollm2-135m"))


# ---- without a model ----------------------------------------------------------------------

@pytest.mark.parametrize("command,option", [
    ([], "generate"), (["generate"], "--max-tokens"), (["generate"], "--block-size"),
    (["chat"], "--system"), (["chat"], "--preemption-mode"), (["serve"], "--port"),
    (["serve"], "--num-gpu-blocks"), (["bench"], "--list"),
])
def test_help_of_each_command_lists_its_options(command, option):
    r = minipaged(*command, "--help")
    assert r.returncode == 0 and option in r.stdout


def test_the_console_script_is_installed_and_runs():
    script = os.path.join(os.path.dirname(sys.executable), "minipaged")
    r = subprocess.run([script, "--version"], capture_output=True, text=True, env=ENV,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("minipaged ")


def test_a_bad_option_value_exits_2_naming_it_without_a_traceback():
    r = minipaged("generate", "hello", "--block-size", "0")
    assert r.returncode == 2
    assert "block_size" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,named", [
    (["chat", "--preemption-mode", "sideways"], "preemption_mode"),
    (["serve", "--attention-backend", "magic"], "attention_backend"),
    (["serve", "--max-num-seqs", "0"], "max_num_seqs"),
    (["generate", "x", "--top-p", "1.5"], "top_p"),
    (["generate", "x", "--max-tokens", "0"], "max_tokens"),
    (["chat", "--temperature", "-1"], "temperature"),
])
def test_every_command_rejects_bad_values_before_loading_anything(args, named, capsys):
    # in-process (the console script is sys.exit(main())): no model is loaded, so the
    # check runs in milliseconds
    from minipaged.entrypoints.cli import main
    assert main(args) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


def test_an_option_of_the_wrong_type_is_refused_by_the_parser():
    r = minipaged("generate", "hello", "--num-gpu-blocks", "many")
    assert r.returncode == 2 and "--num-gpu-blocks" in r.stderr


def test_generate_without_a_prompt_exits_2():
    r = minipaged("generate")
    assert r.returncode == 2 and "PROMPT" in r.stderr


def test_a_bad_model_path_exits_1_with_a_message(tmp_path):
    missing = tmp_path / "no-such-model.gguf"
    r = minipaged("generate", "hello", "--model", str(missing), *MODEL_ARGS)
    assert r.returncode == 1
    assert str(missing) in r.stderr and "Traceback" not in r.stderr


def test_bench_lists_the_benchmark_modules_and_rejects_unknown_ones():
    listed = minipaged("bench", "--list")
    assert listed.returncode == 0 and "kernels" in listed.stdout.split()
    unknown = minipaged("bench", "no-such-benchmark")
    assert unknown.returncode == 2 and "kernels" in unknown.stderr


def test_bench_hands_the_rest_of_the_line_to_the_benchmark():
    r = minipaged("bench", "kernels", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: minipaged bench kernels")


# ---- with the model -----------------------------------------------------------------------

@pytest.mark.slow
def test_generate_json_has_one_result_per_prompt_whose_tokens_decode_to_its_text(model_runs,
                                                                                 tokenizer):
    r = model_runs["json"]
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert [x["prompt"] for x in results] == ["The capital of France is", "Water boils at"]
    for x in results:
        (out,) = x["outputs"]
        assert out["finish_reason"] in ("length", "stop") and len(out["token_ids"]) <= 6
        assert out["finish_reason"] == "stop" or len(out["token_ids"]) == 6
        assert tokenizer.decode(out["token_ids"], skip_special_tokens=True) == out["text"]
        assert x["prompt_token_ids"] == tokenizer.encode(x["prompt"])


@pytest.mark.slow
def test_generate_shows_a_progress_bar_on_stderr_for_several_prompts(model_runs):
    err = model_runs["json"].stderr
    assert "Processed prompts" in err and "2/2" in err


@pytest.mark.slow
def test_generate_prints_the_completion_and_the_chat_streams_the_same_reply(model_runs):
    plain, chat = model_runs["plain"], model_runs["chat"]
    assert plain.returncode == 0, plain.stderr
    assert chat.returncode == 0, chat.stderr
    reply = plain.stdout.rstrip("\n")
    assert reply
    # generate --chat goes through LLM.chat; the chat REPL steps the engine itself and
    # prints streamed deltas: greedy, both must print the same answer
    assert chat.stdout == reply + "\n"
