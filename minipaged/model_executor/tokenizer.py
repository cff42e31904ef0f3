"""Text <-> token ids, and streaming detokenization (the edges of the serving loop, section 4.2).

Tokenization is a library's job: `get_tokenizer` loads a transformers fast tokenizer
(tokenizer.json, with the chat template and the EOS token) from a checkpoint directory.
What is ours is the streaming step: the engine produces one token at a time and the
server sends text as it appears, but a token is not a piece of text. A byte-level BPE
token may hold half of a UTF-8 character, and SentencePiece-style tokenizers drop or add
a leading space depending on what precedes a token. `detokenize_incrementally` (the
scheme vLLM uses) decodes a small window of recent tokens twice, with and without the
newest ones, and emits only the difference once it no longer ends in an incomplete
character.

Invariant: the concatenation of everything `detokenize_incrementally` emits over a stream
equals `tokenizer.decode(all_ids[start:])` up to a trailing incomplete character that
is held back until it completes; it never emits U+FFFD for a split character.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

#: tokens of context decoded before the first new one (vLLM: INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)
INITIAL_OFFSET = 5
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def has_tokenizer(path: str | Path) -> bool:
    """Whether a checkpoint directory carries tokenizer files."""
    return any((Path(path) / name).is_file() for name in _TOKENIZER_FILES)


def get_tokenizer(path: str | Path):
    """The transformers fast tokenizer (PreTrainedTokenizerFast) of a checkpoint directory."""
    path = Path(path)
    if not has_tokenizer(path):
        raise ValueError(f"path: {path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    if (path / "tokenizer.json").is_file():
        # the direct class: AutoTokenizer would first import the model's transformers
        # config module (seconds of imports) only to pick this same class
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:   # vocab.json + merges.txt or tokenizer.model: let transformers convert it
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"path: {path} has no fast (tokenizers-library) tokenizer")
    return tokenizer


def detokenize_incrementally(tokenizer, token_ids: Sequence[int], prefix_offset: int,
                             read_offset: int, skip_special_tokens: bool = False
                             ) -> tuple[str, int, int]:
    """The text the newest tokens add: (new_text, new_prefix_offset, new_read_offset).

    token_ids: the whole sequence so far. Tokens before read_offset were already turned
    into text; tokens prefix_offset..read_offset are the context decoded again so that
    spacing and merges at the boundary come out as in a full decode. Start a stream with
    `initial_offsets(len(prompt_ids))`, then feed each returned pair back in.
    """
    prefix_text = tokenizer.decode(token_ids[prefix_offset:read_offset],
                                   skip_special_tokens=skip_special_tokens)
    full_text = tokenizer.decode(token_ids[prefix_offset:],
                                 skip_special_tokens=skip_special_tokens)
    if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
        # the window decodes to complete characters: emit what the new tokens added
        return full_text[len(prefix_text):], read_offset, len(token_ids)
    # an incomplete character (or nothing yet): wait for more tokens
    return "", prefix_offset, read_offset


def initial_offsets(num_prompt_tokens: int) -> tuple[int, int]:
    """(prefix_offset, read_offset) for a stream whose first new token follows the prompt."""
    return max(num_prompt_tokens - INITIAL_OFFSET, 0), num_prompt_tokens


class IncrementalDetokenizer:
    """The offsets of one stream, kept for the caller: `push(all_ids) -> new text`."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset, self.read_offset = initial_offsets(len(prompt_ids))
        self.text = ""

    def push(self, token_ids: Sequence[int]) -> str:
        """token_ids: the whole sequence so far (prompt included); returns the new text."""
        new, self.prefix_offset, self.read_offset = detokenize_incrementally(
            self.tokenizer, token_ids, self.prefix_offset, self.read_offset,
            self.skip_special_tokens)
        self.text += new
        return new
