"""`LLM.generate` and `LLM.chat` take prompts the way vLLM's offline API does: text, token
ids, or the dict forms {"prompt": ...} / {"prompt_token_ids": ...}; anything else, or a
list of sampling parameters of the wrong length, is a ValueError naming the argument and
nothing is left in the engine. So is a KV budget too small for a single block.
"""

from __future__ import annotations

import pytest

from minipaged import LLM, SamplingParams
from minipaged.benchmarks.workload import smoke_model

# the shared session-scoped models (until tests/conftest.py registers the module)
pytest_plugins = ["tests.fixtures_models"]

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A tiny random LLaMA with no tokenizer: prompts are token ids."""
    return LLM(model=str(smoke_model(tmp_path_factory.mktemp("llm-api"))), max_model_len=64,
               seed=0)


@pytest.fixture(scope="module")
def tiny_llm_with_chat_template(tmp_path_factory, smollm2):
    """The same tiny model with SmolLM2's tokenizer beside it (for chat's checks only)."""
    path = smoke_model(tmp_path_factory.mktemp("llm-api-chat"))
    smollm2.tokenizer.save_pretrained(path)
    return LLM(model=str(path), max_model_len=64, seed=0)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_a_dict_of_prompt_token_ids_generates_what_the_ids_do(tiny_llm):
    ids = [5, 6, 7, 8]
    as_dict = tiny_llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)
    as_list = tiny_llm.generate([ids], GREEDY, use_tqdm=False)
    assert token_ids(as_dict) == token_ids(as_list)
    assert as_dict[0].prompt_token_ids == ids


def test_a_dict_prompt_keeps_its_text_beside_its_token_ids(tiny_llm):
    out = tiny_llm.generate([{"prompt": "five six", "prompt_token_ids": [5, 6]}], GREEDY,
                            use_tqdm=False)
    assert out[0].prompt == "five six" and out[0].prompt_token_ids == [5, 6]
    assert token_ids(out) == token_ids(tiny_llm.generate([[5, 6]], GREEDY, use_tqdm=False))


@pytest.mark.parametrize("prompts,named", [
    (123, "prompts"),                                  # not a prompt, not a list
    ([[5, "six"]], r"prompts\[0\]"),                   # ids must be integers
    ([[5, 6], {"text": "x"}], r"prompts\[1\]"),        # an unknown dict key
    ([{}], r"prompts\[0\]"),                           # a dict with neither key
])
def test_a_prompt_of_another_form_is_a_value_error_naming_it(tiny_llm, prompts, named):
    with pytest.raises(ValueError, match=named):
        tiny_llm.generate(prompts, GREEDY, use_tqdm=False)
    assert not tiny_llm.llm_engine.has_unfinished_requests()
    stats = tiny_llm.stats()
    assert stats["num_free_blocks"] == stats["num_gpu_blocks"]


def test_generate_wants_one_sampling_params_or_one_per_prompt(tiny_llm):
    with pytest.raises(ValueError, match="sampling_params: 1 given for 2 prompts"):
        tiny_llm.generate([[5], [6]], [GREEDY], use_tqdm=False)


def test_chat_wants_one_sampling_params_or_one_per_conversation(tiny_llm_with_chat_template):
    conversations = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
    with pytest.raises(ValueError, match="sampling_params: 1 given for 2 prompts"):
        tiny_llm_with_chat_template.chat(conversations, [GREEDY], use_tqdm=False)
    assert not tiny_llm_with_chat_template.llm_engine.has_unfinished_requests()


def test_a_kv_cache_memory_too_small_for_one_block_is_a_value_error(tmp_path):
    # bytes, not GiB: kv_cache_memory=1 would otherwise leave a pool with no block
    with pytest.raises(ValueError, match="kv_cache_memory=1 bytes holds no KV block"):
        LLM(model=str(smoke_model(tmp_path)), kv_cache_memory=1)
