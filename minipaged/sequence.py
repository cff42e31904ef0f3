"""Sequences and sequence groups: the request-side state the scheduler moves around
(paper section 4.2-4.5; vLLM's v0 Sequence / SequenceGroup).

A *request* is a SequenceGroup: one prompt and the sequences generated from it (one for
greedy or sampling, best_of for parallel sampling, the live beams and kept hypotheses for
beam search). The paper schedules and preempts whole groups, because their sequences
share KV blocks. The blocks themselves are the block manager's; a Sequence only carries
its tokens, keyed by a unique integer `seq_id` that the block manager uses.

Invariant: `num_computed_tokens <= get_len()`. The tokens [0, num_computed_tokens) have
their K/V in the cache; the rest (the whole prompt at admission, the last sampled token
in decode, prompt + outputs after a recompute preemption) are fed to the model next.
"""

from __future__ import annotations

import copy
import enum
import itertools
import time
from collections.abc import Collection, Iterable
from typing import Callable, Union

from minipaged.outputs import RequestMetrics
from minipaged.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()            # queued: no KV in the cache (new, or preempted by recompute)
    RUNNING = enum.auto()            # its KV blocks are on the device
    SWAPPED = enum.auto()            # preempted by swapping: its KV blocks are in host memory
    FINISHED_STOPPED = enum.auto()   # EOS, a stop token id or a stop string
    FINISHED_LENGTH = enum.auto()    # max_tokens reached or the context is full
    FINISHED_ABORTED = enum.auto()   # aborted by the user, or a beam that was pruned

    @staticmethod
    def is_finished(status: "SequenceStatus") -> bool:
        return status in _FINISH_REASONS

    @staticmethod
    def finish_reason(status: "SequenceStatus") -> Union[str, None]:
        """The OpenAI-style reason: "stop", "length", "abort", or None while unfinished."""
        return _FINISH_REASONS.get(status)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


def make_seq_id_counter(start: int = 0) -> Callable[[], int]:
    """A callable handing out 0, 1, 2, ...; the engine keeps one per engine."""
    return itertools.count(start).__next__


class Sequence:
    """One token sequence: the prompt plus what was generated from it so far."""

    def __init__(self, seq_id: int, prompt_token_ids: Iterable[int],
                 prompt: Union[str, None] = None, *, eos_token_ids: Collection[int] = (),
                 return_logprobs: bool = False) -> None:
        self.seq_id = int(seq_id)
        self.prompt = prompt
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty.")
        #: the model's end-of-sequence ids; used by the beam score (EOS is not counted)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.output_token_ids: list[int] = []
        #: per output token, {token_id: logprob} (chosen + top-k); None when not requested
        self.output_logprobs: Union[list[dict[int, float]], None] = [] if return_logprobs else None
        #: the sum of the output tokens' logprobs; None once a token came without one
        #: (a greedy row whose logits were never formed: BatchItem.argmax_only)
        self.cumulative_logprob: Union[float, None] = 0.0
        self.status = SequenceStatus.WAITING
        #: detokenized output, maintained by the engine (stop strings are trimmed off it)
        self.output_text = ""
        #: the stop string or stop token id that finished it (None for EOS / length)
        self.stop_reason: Union[int, str, None] = None
        #: tokens whose K/V is in the cache (see the module invariant)
        self.num_computed_tokens = 0
        #: the engine's incremental-detokenizer state; copied by fork
        self.detokenizer_state: object = None

    # -- lengths and tokens -----------------------------------------------------------

    def get_prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def get_output_len(self) -> int:
        return len(self.output_token_ids)

    def get_len(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def get_token_ids(self) -> list[int]:
        """Prompt followed by outputs (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def get_num_uncomputed_tokens(self) -> int:
        """Tokens the model must still be fed before this sequence can sample again."""
        return self.get_len() - self.num_computed_tokens

    def mark_computed(self, num_tokens: int) -> None:
        """Record that `num_tokens` more tokens had their K/V written this step."""
        if num_tokens < 0 or self.num_computed_tokens + num_tokens > self.get_len():
            raise ValueError(f"num_tokens={num_tokens} would make num_computed_tokens exceed "
                             f"the sequence length {self.get_len()} "
                             f"(now {self.num_computed_tokens}).")
        self.num_computed_tokens += num_tokens

    # -- growth -----------------------------------------------------------------------

    def append_token(self, token_id: int, logprobs: Union[dict[int, float], None]) -> None:
        """Append a sampled token; `logprobs` must contain it (its logprob is summed), or
        be None for a token chosen without its logprob (then cumulative_logprob is None)."""
        if logprobs is None:
            if self.output_logprobs is not None:
                raise ValueError("logprobs is None, but this sequence reports logprobs.")
            self.output_token_ids.append(int(token_id))
            self.cumulative_logprob = None
            return
        if token_id not in logprobs:
            raise ValueError(f"logprobs must contain the appended token_id {token_id}.")
        self.output_token_ids.append(int(token_id))
        if self.cumulative_logprob is not None:
            self.cumulative_logprob += float(logprobs[token_id])
        if self.output_logprobs is not None:
            self.output_logprobs.append(dict(logprobs))

    def fork(self, new_seq_id: int) -> "Sequence":
        """An independent copy of the token state under a new id (the block tables are
        forked separately, by the block manager)."""
        # Not deepcopy: that walks every token (1 ms at 2000 tokens) and beam search forks
        # every step. The token lists are copied; the prompt is never mutated, so shared.
        child = copy.copy(self)
        child.seq_id = int(new_seq_id)
        child.output_token_ids = list(self.output_token_ids)
        if self.output_logprobs is not None:
            child.output_logprobs = [dict(d) for d in self.output_logprobs]
        return child

    def reset_for_recompute(self) -> None:
        """Preemption by recomputation (paper section 4.5): the KV blocks are dropped but
        the tokens are kept, so on re-admission prompt + outputs are prefilled together."""
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING

    # -- status -----------------------------------------------------------------------

    def is_finished(self) -> bool:
        return SequenceStatus.is_finished(self.status)

    @property
    def finish_reason(self) -> Union[str, None]:
        return SequenceStatus.finish_reason(self.status)

    def get_beam_search_score(self, length_penalty: float = 1.0,
                              seq_len: Union[int, None] = None) -> float:
        """cumulative_logprob / seq_len ** length_penalty, as vLLM v0 (after HF): seq_len
        is the whole length, prompt included, not counting a final EOS token."""
        if seq_len is None:
            seq_len = self.get_len()
            if self.output_token_ids and self.output_token_ids[-1] in self.eos_token_ids:
                seq_len -= 1
        return self.cumulative_logprob / (seq_len**length_penalty)

    def __repr__(self) -> str:
        return (f"Sequence(seq_id={self.seq_id}, status={self.status.name}, "
                f"prompt_len={self.get_prompt_len()}, output_token_ids={self.output_token_ids}, "
                f"num_computed_tokens={self.num_computed_tokens})")


class SequenceGroup:
    """One request: its sequences (insertion-ordered), parameters and timing."""

    def __init__(self, request_id: str, seqs: Iterable[Sequence],
                 sampling_params: SamplingParams, arrival_time: Union[float, None] = None
                 ) -> None:
        self.request_id = request_id
        self.seqs_dict: dict[int, Sequence] = {}
        for seq in seqs:
            self.add(seq)
        if not self.seqs_dict:
            raise ValueError("seqs must hold at least one Sequence.")
        first = next(iter(self.seqs_dict.values()))
        self.prompt = first.prompt
        self.prompt_token_ids = list(first.prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)
        #: prompt tokens served from the prefix cache; set by the engine when admitted
        self.num_cached_tokens: Union[int, None] = None
        #: per prompt token, its logprob entry (minipaged/prompt_logprobs.py), if asked for
        self.prompt_logprobs = None if sampling_params.prompt_logprobs is None else [None]
        #: the request's own generator for seeded sampling (a CPU generator, so a seed
        #: gives the same tokens on every device and in every batch)
        self.generator = None
        if sampling_params.seed is not None:
            import torch  # sampling needs torch anyway; keep this module light to import

            self.generator = torch.Generator().manual_seed(sampling_params.seed)

    @classmethod
    def from_prompt(cls, request_id: str, prompt_token_ids: Iterable[int],
                    sampling_params: SamplingParams, next_seq_id: Callable[[], int], *,
                    prompt: Union[str, None] = None, eos_token_ids: Collection[int] = (),
                    arrival_time: Union[float, None] = None) -> "SequenceGroup":
        """A new request holding one WAITING sequence (forked later for best_of / beams)."""
        seq = Sequence(next_seq_id(), prompt_token_ids, prompt, eos_token_ids=eos_token_ids,
                       return_logprobs=sampling_params.logprobs is not None)
        return cls(request_id, [seq], sampling_params, arrival_time)

    # -- membership -------------------------------------------------------------------

    @property
    def seqs(self) -> list[Sequence]:
        return list(self.seqs_dict.values())

    def get_seqs(self, status: Union[SequenceStatus, None] = None) -> list[Sequence]:
        return [s for s in self.seqs_dict.values() if status is None or s.status == status]

    def num_seqs(self, status: Union[SequenceStatus, None] = None) -> int:
        return len(self.seqs_dict) if status is None else len(self.get_seqs(status))

    def get_unfinished_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs_dict.values() if not s.is_finished()]

    def num_unfinished_seqs(self) -> int:
        return sum(1 for s in self.seqs_dict.values() if not s.is_finished())

    def get_finished_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs_dict.values() if s.is_finished()]

    def find(self, seq_id: int) -> Sequence:
        if seq_id not in self.seqs_dict:
            raise ValueError(f"seq_id {seq_id} is not in request {self.request_id!r}.")
        return self.seqs_dict[seq_id]

    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self.seqs_dict:
            raise ValueError(f"seq_id {seq.seq_id} is already in request {self.request_id!r}.")
        self.seqs_dict[seq.seq_id] = seq

    def remove(self, seq_id: int) -> Sequence:
        return self.seqs_dict.pop(self.find(seq_id).seq_id)

    def is_finished(self) -> bool:
        return all(s.is_finished() for s in self.seqs_dict.values())

    def get_max_num_running_seqs(self) -> int:
        """The most sequences this group will run at once in its remaining life: what
        the scheduler must budget for (the prompt stage of best_of forks best_of)."""
        params = self.sampling_params
        if params.use_beam_search:
            return params.beam_width
        if params.best_of > self.num_seqs():
            return params.best_of
        return self.num_unfinished_seqs()

    def abort(self) -> list[Sequence]:
        """Mark every unfinished sequence FINISHED_ABORTED; returns them (their blocks
        must be freed by the caller)."""
        aborted = self.get_unfinished_seqs()
        for seq in aborted:
            seq.status = SequenceStatus.FINISHED_ABORTED
        return aborted

    # -- timing -----------------------------------------------------------------------

    def mark_scheduled(self, now: Union[float, None] = None) -> None:
        if self.metrics.first_scheduled_time is None:
            self.metrics.first_scheduled_time = time.monotonic() if now is None else now

    def mark_token(self, now: Union[float, None] = None) -> None:
        now = time.monotonic() if now is None else now
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = now
        self.metrics.last_token_time = now

    def mark_finished(self, now: Union[float, None] = None) -> None:
        if self.metrics.finished_time is None:
            self.metrics.finished_time = time.monotonic() if now is None else now

    def __repr__(self) -> str:
        return (f"SequenceGroup(request_id={self.request_id!r}, "
                f"sampling_params={self.sampling_params!r}, num_seqs={self.num_seqs()})")
