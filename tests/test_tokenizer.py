"""Our tokenizer (converted once from the GGUF, cached as tokenizer.json) and streaming text.

The ids must be transformers' GGUF tokenizer's ids, on text chosen to stress byte-level
BPE: accents, CJK, emoji (4-byte UTF-8), runs of spaces, tabs and newlines, code, and the
special tokens of the chat template. Streaming detokenization must rebuild the full
decode exactly and never emit half a character.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings

from minipaged.model_executor.tokenizer import (
    IncrementalDetokenizer,
    detokenize_incrementally,
    initial_offsets,
)
from tests.strategies import unicode_texts

# the shared session-scoped models (until tests/conftest.py registers the module)
pytest_plugins = ["tests.fixtures_models"]

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café résumé Ångström",
    "中文字符和日本語のテキスト",
    "emoji: 😀🚀👩‍👩‍👧 and flags 🇫🇷",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\n\nnewlines\r\n  mixed \t\n",
    "def f(x):\n    return x ** 2  # square\n",
    "numbers 1234567890 3.14159 -42 1e-5",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Name a prime 🙂"},
     {"role": "assistant", "content": "7"},
     {"role": "user", "content": "Another?"}],
]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_transformers_gguf_tokenizer(smollm2, hf_smollm2_tokenizer, text):
    assert smollm2.tokenizer(text).input_ids == hf_smollm2_tokenizer(text).input_ids


@pytest.mark.parametrize("messages", MESSAGES)
def test_chat_template_output_and_ids_equal_transformers(smollm2, hf_smollm2_tokenizer,
                                                         messages):
    ours = smollm2.tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
    theirs = hf_smollm2_tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n")
    assert smollm2.tokenizer(ours).input_ids == hf_smollm2_tokenizer(theirs).input_ids


def test_tokenizer_knows_its_eos_token_and_the_config_stops_on_it(smollm2):
    tok = smollm2.tokenizer
    assert tok.eos_token == "<|im_end|>"
    assert tok.eos_token_id in smollm2.config.eos_token_ids
    assert tok.chat_template
    # special tokens stay whole
    assert tok("<|im_end|>").input_ids == [tok.eos_token_id]


def _stream(tok, ids: list[int], prompt_len: int = 0) -> list[str]:
    """Feed ids one at a time after a prompt of prompt_len tokens; the emitted pieces."""
    prefix, read = initial_offsets(prompt_len)
    pieces = []
    for n in range(prompt_len + 1, len(ids) + 1):
        new, prefix, read = detokenize_incrementally(tok, ids[:n], prefix, read)
        pieces.append(new)
    return pieces


@pytest.mark.parametrize("text", [t for t in TEXTS if t])
def test_streamed_text_equals_full_decode(smollm2, text):
    tok = smollm2.tokenizer
    ids = tok(text).input_ids
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_stream_holds_back_a_split_emoji_until_it_completes(smollm2):
    tok = smollm2.tokenizer
    ids = tok("🚀").input_ids
    assert len(ids) > 1                      # byte-level BPE splits its 4 UTF-8 bytes
    pieces = _stream(tok, ids)
    assert pieces[:-1] == [""] * (len(ids) - 1)
    assert pieces[-1] == "🚀"


def test_stream_after_a_prompt_emits_only_the_continuation(smollm2):
    tok = smollm2.tokenizer
    prompt = tok("Question: where is Paris?").input_ids
    answer = tok(" In France 🇫🇷, naturally.").input_ids
    detok = IncrementalDetokenizer(tok, prompt)
    for n in range(len(prompt) + 1, len(prompt) + len(answer) + 1):
        detok.push(prompt + answer[:n - len(prompt)])
    assert detok.text == tok.decode(prompt + answer)[len(tok.decode(prompt)):]


@settings(max_examples=40)
@given(text=unicode_texts)
@example(text="\ufffd")                    # a literal U+FFFD at the very end
@example(text="a\ufffdb")                  # ... and in the middle
def test_streaming_any_text_only_ever_extends_a_prefix_of_its_decode(smollm2, text):
    # A U+FFFD sent for half a character would not be in the full decode, where the
    # whole character stands: every piece extending a prefix of it rules that out. What
    # is never sent is a held-back end that decodes to U+FFFD, as in vLLM: streaming
    # cannot tell a literal U+FFFD at the very end from the start of a character.
    tok = smollm2.tokenizer
    ids = tok(text).input_ids
    full, sent = tok.decode(ids), ""
    for piece in _stream(tok, ids):
        sent += piece
        assert full.startswith(sent)
    assert sent == full or full.endswith("\ufffd")
