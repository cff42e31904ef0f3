"""SamplingParams: what a request asks of the decoder (paper section 4.4, "Supporting
various decoding scenarios"; the fields and their checks follow vLLM's v0 API).

The paper's point is that one memory manager serves every decoding method: greedy and
random sampling keep one sequence per request, parallel sampling (n / best_of) forks
sequences that share the prompt's blocks, beam search forks and frees beams every step.
This module only *describes* the request; `minipaged.sampler` turns logits into tokens
and `minipaged.beam_search` runs beams.

Invariant: a SamplingParams that exists is valid. Every check runs in __post_init__ and
raises ValueError whose message starts with the offending field's name, and the object is
normalised there once (best_of defaults to n, stop becomes a list, a greedy request has
top_p = 1, top_k = -1, min_p = 0), so nothing downstream re-validates it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union

#: temperatures below this are greedy decoding (vLLM's _SAMPLING_EPS)
SAMPLING_EPS = 1e-5


class SamplingType(enum.IntEnum):
    """How the sampler picks a token for a row (vLLM's SamplingType)."""

    GREEDY = 0       # argmax of the processed logits
    RANDOM = 1       # multinomial draw with the engine's generator
    RANDOM_SEED = 2  # multinomial draw with the request's own seeded generator
    BEAM = 3         # no draw: beam search ranks candidates by cumulative logprob


@dataclass
class SamplingParams:
    """Decoding parameters of one request, with vLLM's names and defaults.

    n: sequences to return. best_of: sequences to generate (default n); the n with the
    highest cumulative logprob are returned (for beam search best_of is the beam width).
    temperature: 0 means greedy. top_p, top_k (-1 = off), min_p (0 = off): truncation.
    seed: a per-request generator, so the request's tokens do not depend on the batch.
    max_tokens: output tokens at most (None = until the context is full). min_tokens:
    EOS and stop_token_ids are masked until this many tokens were generated.
    stop: strings that end the output (trimmed unless include_stop_str_in_output).
    stop_token_ids: token ids that end the output. ignore_eos: keep going past EOS.
    logprobs: also return the top-`logprobs` log-probabilities of each step (plus the
    chosen token's). presence/frequency_penalty (OpenAI, over the output) and
    repetition_penalty (HF/CTRL, over prompt and output). use_beam_search with
    length_penalty and early_stopping (True, False or "never", as HF/vLLM).
    prompt_logprobs: also return, for each prompt token after the first, its
    log-probability given the tokens before it, with the top-`prompt_logprobs` others
    (the model's raw log-softmax; no sampling parameter applies). Such a request does not
    read the prefix cache: every prompt position must be computed.
    """

    n: int = 1
    best_of: Union[int, None] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: Union[int, None] = None
    max_tokens: Union[int, None] = 16
    min_tokens: int = 0
    stop: Union[str, list[str], None] = None
    stop_token_ids: Union[list[int], None] = None
    ignore_eos: bool = False
    logprobs: Union[int, None] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: Union[int, None] = None

    def __post_init__(self) -> None:
        if self.best_of is None:
            self.best_of = self.n
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        self._verify_args()
        if self.use_beam_search:
            self._verify_beam_search()
        else:
            self._verify_non_beam_search()
            if self.temperature < SAMPLING_EPS:
                # Greedy: truncation cannot change the argmax, so switch it off (as vLLM).
                self.top_p, self.top_k, self.min_p = 1.0, -1, 0.0
                if self.best_of > 1:
                    raise ValueError(
                        f"best_of must be 1 when using greedy sampling (temperature 0): "
                        f"all {self.best_of} samples would be the same, got {self.best_of}."
                    )

    # -- checks -----------------------------------------------------------------------

    def _verify_args(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer of at least 1, got {self.n!r}.")
        if not _is_int(self.best_of) or self.best_of < self.n:
            raise ValueError(
                f"best_of must be an integer greater than or equal to n, "
                f"got n={self.n} and best_of={self.best_of!r}."
            )
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not _is_int(self.top_k) or self.top_k < -1 or self.top_k == 0:
            raise ValueError(f"top_k must be -1 (disable), or at least 1, got {self.top_k!r}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}.")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be at least 1 (or None), got {self.max_tokens!r}.")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be at least 0, got {self.min_tokens!r}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be at most max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}.")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ValueError(
                f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}."
            )
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs must be a non-negative integer, got {self.logprobs!r}.")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or self.prompt_logprobs < 0):
            raise ValueError("prompt_logprobs must be a non-negative integer, "
                             f"got {self.prompt_logprobs!r}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not self.repetition_penalty > 0.0:
            raise ValueError(
                f"repetition_penalty must be greater than zero, got {self.repetition_penalty}."
            )
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(
                f"early_stopping must be True, False, or 'never', got {self.early_stopping!r}."
            )

    def _verify_beam_search(self) -> None:
        # Beam search ranks by the model's own log-probabilities: no temperature, no
        # truncation. (vLLM also rejects best_of == 1; a width-1 beam is allowed here.)
        if self.temperature > SAMPLING_EPS:
            raise ValueError(
                f"temperature must be 0 when using beam search, got {self.temperature}.")
        if self.top_p < 1.0 - SAMPLING_EPS:
            raise ValueError(f"top_p must be 1 when using beam search, got {self.top_p}.")
        if self.top_k != -1:
            raise ValueError(f"top_k must be -1 when using beam search, got {self.top_k}.")

    def _verify_non_beam_search(self) -> None:
        if self.early_stopping is not False:
            raise ValueError("early_stopping only applies to beam search and must be False.")
        if abs(self.length_penalty - 1.0) > SAMPLING_EPS:
            raise ValueError(
                f"length_penalty only applies to beam search and must be 1.0, "
                f"got {self.length_penalty}."
            )

    # -- derived ----------------------------------------------------------------------

    @property
    def sampling_type(self) -> SamplingType:
        if self.use_beam_search:
            return SamplingType.BEAM
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def is_greedy(self) -> bool:
        return self.sampling_type == SamplingType.GREEDY

    @property
    def beam_width(self) -> int:
        """Beams kept alive per step (= best_of, which defaults to n)."""
        return int(self.best_of)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
