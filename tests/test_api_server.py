"""The OpenAI-compatible server, run for real: `minipaged serve` as a subprocess on a free
loopback port with SmolLM2-135M, driven by the official `openai` client (and httpx where
a client library would refuse to send the bad input).

One server serves the whole module (loading the model is the slow part). It runs with a
small KV pool and one torch thread, and every request asks for a handful of tokens.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
NUM_GPU_BLOCKS = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """The base URL of a running `minipaged serve`; the process is gone after the module."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "minipaged", "serve", "--model", MODEL, "--port", str(port),
           "--num-gpu-blocks", str(NUM_GPU_BLOCKS), "--max-model-len", "512",
           "--swap-space", "0", "--log-level", "warning"]
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not become healthy within 300 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer():
    """The model's tokenizer, loaded in the test process to count tokens independently."""
    from minipaged.model_executor.tokenizer import get_tokenizer
    from minipaged.model_executor.weight_loader import checkpoint_dir
    return get_tokenizer(checkpoint_dir(MODEL))


@pytest.fixture(scope="module")
def greedy_completion(client):
    """The non-streamed greedy completion of PROMPT: 8 tokens."""
    return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)


def metrics(http) -> dict[str, float]:
    """Every sample of /metrics by name (labels folded into the name), parsed strictly."""
    samples = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return samples


def wait_until_idle(http, timeout: float = 60.0) -> dict[str, float]:
    """/metrics once nothing runs or waits (the engine frees blocks at step boundaries)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(http)
        if (m["minipaged_num_requests_running"] == 0 and m["minipaged_num_requests_waiting"] == 0
                or time.monotonic() > deadline):
            return m
        time.sleep(0.25)


def stream_text(stream) -> tuple[dict[int, str], dict[int, str]]:
    """(text, finish_reason) per choice index of a streamed completion or chat."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons


# ---- the happy paths ------------------------------------------------------------------------

def test_health_and_models_list_the_served_model(http, client):
    assert http.get("/health").status_code == 200
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_reports_token_usage_of_prompt_and_output(greedy_completion, tokenizer):
    choice = greedy_completion.choices[0]
    assert choice.text and choice.finish_reason == "length"
    usage = greedy_completion.usage
    assert usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert usage.completion_tokens == 8
    assert usage.total_tokens == usage.prompt_tokens + 8


def test_greedy_completion_is_the_same_when_its_prefix_is_cached(client, greedy_completion):
    again = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert again.choices[0].text == greedy_completion.choices[0].text


def test_streamed_completion_concatenates_to_the_non_streamed_text(client, greedy_completion):
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                       stream=True)
    texts, reasons = stream_text(stream)
    assert texts == {0: greedy_completion.choices[0].text}
    assert reasons == {0: "length"}


def test_stream_ends_with_done_and_can_carry_usage(http):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert '"usage":{"prompt_tokens"' in events[-2].replace(" ", "")


def test_stop_string_ends_the_text_before_it_streamed_or_not(client):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=["."])
    whole = client.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "stop" and "." not in whole.text
    texts, reasons = stream_text(client.completions.create(stream=True, **kwargs))
    assert texts == {0: whole.text} and reasons == {0: "stop"}


def test_chat_applies_the_models_chat_template(client, tokenizer):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8,
                                           temperature=0)
    templated = tokenizer.apply_chat_template(MESSAGES, tokenize=False,
                                              add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(tokenizer.encode(templated, add_special_tokens=False))
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens <= 8


def test_streamed_chat_concatenates_to_the_non_streamed_reply(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    texts, reasons = stream_text(chunks)
    assert texts == {0: whole.message.content}
    assert reasons == {0: whole.finish_reason}


def test_n_returns_n_choices_and_counts_all_their_tokens(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0,
                                    n=3, seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 3 * 6


def test_streamed_n_choices_each_end_with_a_finish_reason(client):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5,
                                            temperature=1.0, n=2, seed=3, stream=True)
    texts, reasons = stream_text(stream)
    assert set(texts) == set(reasons) == {0, 1}


def test_the_same_seed_gives_the_same_sample(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0,
                  seed=1234)
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first


def test_completion_logprobs_describe_the_greedy_tokens(client, greedy_completion):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                    logprobs=3)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text == greedy_completion.choices[0].text
    assert "".join(lp.tokens) == choice.text
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3
        # greedy: the chosen token is the most likely one (same float, no tolerance)
        assert chosen == max(top.values()) and chosen <= 0.0


@pytest.mark.parametrize("logprobs,temperature", [(0, 0.0), (1, 1.5)])
def test_completion_top_logprobs_always_hold_the_sampled_token(client, logprobs, temperature):
    # OpenAI's legacy API: up to logprobs + 1 entries, the sampled token always among them
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, seed=5,
                                    temperature=temperature, logprobs=logprobs)
    lp = out.choices[0].logprobs
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == chosen
        assert 1 <= len(top) <= logprobs + 1


def test_streamed_completion_logprobs_offsets_count_from_the_start_of_the_text(client):
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                       temperature=0, logprobs=1, stream=True)
    text, offsets, tokens = "", [], []
    for chunk in stream:
        choice = chunk.choices[0]
        if choice.logprobs is not None:
            assert choice.logprobs.text_offset[0] == len(text)   # where this chunk starts
            offsets += choice.logprobs.text_offset
            tokens += choice.logprobs.tokens
        text += choice.text
    assert len(tokens) == 8 and "".join(tokens) == text
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_echo_with_logprobs_scores_the_prompt_before_the_completion(client, tokenizer):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                    logprobs=1, echo=True)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                      temperature=0, logprobs=1)
    choice, n = out.choices[0], len(tokenizer.encode(PROMPT))
    lp = choice.logprobs
    assert choice.text == PROMPT + plain.choices[0].text
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == n + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None   # nothing before it
    assert all(x <= 0.0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n + 4)]
    # the completion's part is the plain request's (fp32 sums may differ in order: 1e-4)
    for a, b in zip(lp.token_logprobs[n:], plain.choices[0].logprobs.token_logprobs):
        assert abs(a - b) <= 1e-4


def test_streamed_echo_with_logprobs_carries_the_same_logprobs_as_the_whole_answer(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                      temperature=0, logprobs=2, echo=True).choices[0]
    text, tokens, offsets, token_lps = "", [], [], []
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                           temperature=0, logprobs=2, echo=True,
                                           stream=True):
        choice = chunk.choices[0]
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens
            offsets += choice.logprobs.text_offset
            token_lps += choice.logprobs.token_logprobs
        text += choice.text
    assert text == whole.text and text.startswith(PROMPT)
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert token_lps[0] is None and whole.logprobs.token_logprobs[0] is None
    for a, b in zip(token_lps[1:], whole.logprobs.token_logprobs[1:]):
        assert abs(a - b) <= 1e-4               # fp32 sums of another batch: 1e-4


def test_a_prompt_logprob_is_the_first_step_logprob_after_the_tokens_before_it(client,
                                                                               tokenizer):
    ids = tokenizer.encode(PROMPT)
    echo = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0,
                                     logprobs=5, echo=True).choices[0].logprobs
    for i in (1, len(ids) - 1):
        first = client.completions.create(model=MODEL, prompt=ids[:i], max_tokens=1,
                                          temperature=0, logprobs=5).choices[0].logprobs
        top, want = echo.top_logprobs[i], first.top_logprobs[0]
        best = max(want, key=want.get)
        assert abs(top[best] - want[best]) <= 1e-4       # the same distribution (fp32)


def test_echo_with_max_tokens_zero_returns_the_prompt_alone_with_its_logprobs(http):
    # how evaluation harnesses ask for a text's log-likelihood
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 0,
                                           "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == PROMPT
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == PROMPT and lp["token_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0.0 for x in lp["token_logprobs"][1:])
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])   # logprobs 0: the token
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == 0 and usage["total_tokens"] == usage["prompt_tokens"]


def test_chat_logprobs_list_each_token_with_its_alternatives(client):
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2
        assert t.logprob == t.top_logprobs[0].logprob   # greedy picks the top one


def test_vllm_extra_fields_are_accepted_and_applied(client, greedy_completion):
    # top_k=1 leaves only the most likely token: sampling at temperature 1 becomes greedy
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0,
                                    extra_body={"top_k": 1, "min_p": 0.0, "ignore_eos": True,
                                                "repetition_penalty": 1.0})
    assert out.choices[0].text == greedy_completion.choices[0].text
    beams = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                      n=2, extra_body={"use_beam_search": True})
    assert len(beams.choices) == 2


# ---- concurrency, disconnects, memory -------------------------------------------------------

def test_sixteen_concurrent_streams_finish_with_the_right_text_and_free_the_cache(client, http):
    prompts = ["The capital of France is", "My favourite colour is", "Water boils at",
               "The first president of the United States was"]
    expected = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=8,
                                             temperature=0).choices[0].text for p in prompts}

    def one(i: int) -> tuple[str, str]:
        p = prompts[i % len(prompts)]
        stream = client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0,
                                           stream=True)
        return p, stream_text(stream)[0][0]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert [text for _, text in results] == [expected[p] for p, _ in results]
    m = wait_until_idle(http)
    assert m["minipaged_kv_cache_usage_perc"] == 0.0
    assert m["minipaged_num_free_gpu_blocks"] == NUM_GPU_BLOCKS


def test_a_client_that_disconnects_mid_stream_has_its_request_aborted_and_blocks_freed(http):
    before = metrics(http).get('minipaged_request_success_total{finished_reason="abort"}', 0.0)
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        received = 0
        for line in r.iter_lines():
            received += line.startswith("data: ")
            if received == 3:
                break                       # leaving the block closes the connection
    # 400 tokens would take minutes; an aborted request stops within a step or two
    m = wait_until_idle(http, timeout=60)
    assert m["minipaged_num_requests_running"] == 0
    assert m['minipaged_request_success_total{finished_reason="abort"}'] == before + 1
    assert m["minipaged_kv_cache_usage_perc"] == 0.0


# ---- bad input ------------------------------------------------------------------------------

BAD_INPUTS = [
    ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_k": 0}, "top_k"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 100}, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 600}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, "prompt"),
    # prompt + max_tokens beyond the 512-token context (OpenAI and vLLM refuse it too)
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 512}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": [1] * 500, "max_tokens": 13},
     "max_tokens"),
    ("/v1/chat/completions", {"model": "no-such-model", "messages": MESSAGES}, "model"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "no role"}]},
     "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "n": 2, "temperature": 0},
     "n"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user",
                                                            "content": "word " * 600}]},
     "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 600},
     "max_tokens"),
]


@pytest.mark.parametrize("path,body,param", BAD_INPUTS,
                         ids=[f"{p.split('/')[-1]}-{param}-{i}"
                              for i, (p, _, param) in enumerate(BAD_INPUTS)])
def test_bad_input_gets_400_naming_the_field_and_the_server_keeps_serving(http, path, body,
                                                                          param):
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"]
    good = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("raw", ['{"model": "smollm2-135m", "prompt": ', "not json", "[1, 2]"])
def test_malformed_json_gets_400_and_the_server_keeps_serving(http, raw):
    r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    good = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    assert good.status_code == 200


def test_the_openai_client_sees_bad_request_errors_with_their_param(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, top_p=0.0)
    assert info.value.status_code == 400 and info.value.param == "top_p"


def test_a_body_sent_without_json_content_type_is_still_read_as_json(http):
    r = http.post("/v1/completions", content='{"model": "smollm2-135m", "prompt": "Hi", '
                  '"max_tokens": 1}', headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200


# ---- metrics --------------------------------------------------------------------------------

def test_metrics_parse_and_their_counters_move(http):
    # a prompt of several full 16-token blocks, sent twice: the second finds them cached
    prompt = "Paged attention splits the key value cache into fixed size blocks. " * 4
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0}
    assert http.post("/v1/completions", json=body).status_code == 200
    before = wait_until_idle(http)
    assert http.post("/v1/completions", json=body).status_code == 200
    after = wait_until_idle(http)
    for name in ("minipaged_prompt_tokens_total", "minipaged_generation_tokens_total",
                 "minipaged_prefix_cache_queries_total", "minipaged_prefix_cache_hits_total",
                 "minipaged_time_to_first_token_seconds_count",
                 "minipaged_inter_token_latency_seconds_count",
                 "minipaged_e2e_request_latency_seconds_count"):
        assert after[name] > before[name], name
    def moved(name: str) -> float:
        return after[name] - before[name]

    assert moved("minipaged_generation_tokens_total") == 4
    assert moved("minipaged_inter_token_latency_seconds_count") == 3     # 4 tokens, 3 gaps
    assert moved("minipaged_time_to_first_token_seconds_count") == 1
    for name in ("minipaged_kv_cache_usage_perc", "minipaged_num_requests_running",
                 "minipaged_num_requests_waiting", "minipaged_num_requests_swapped",
                 "minipaged_num_preemptions_total"):
        assert name in after
