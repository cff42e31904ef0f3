"""What a request gets back: RequestOutput, CompletionOutput and RequestMetrics (the
shapes of vLLM's offline API, so a script moves between the two by changing one import).

Parallel sampling and beam search (paper section 4.4) generate more sequences than the
user asked for: `RequestOutput.from_seq_group` keeps the n best of them, by cumulative
logprob for best_of and by length-penalised beam score for beam search.

Invariant: these are plain values built from a SequenceGroup at one moment; nothing here
points back into the engine's live state that can still change (output token lists and
logprobs are copied; the prompt's ids, which never change, are shared, so streaming a
long prompt's request does not copy it every step).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # only for type hints: sequence.py imports this module
    from minipaged.sequence import SequenceGroup


@dataclass
class RequestMetrics:
    """Wall-clock times (time.monotonic() seconds by default) of one request's life."""

    arrival_time: float
    first_scheduled_time: Union[float, None] = None
    first_token_time: Union[float, None] = None
    last_token_time: Union[float, None] = None
    finished_time: Union[float, None] = None

    @property
    def time_in_queue(self) -> Union[float, None]:
        """Seconds between arrival and first being scheduled."""
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    def __repr__(self) -> str:
        def fmt(t: Union[float, None]) -> str:
            return "None" if t is None else f"{t:.4f}"

        return (
            f"RequestMetrics(arrival_time={fmt(self.arrival_time)}, "
            f"first_scheduled_time={fmt(self.first_scheduled_time)}, "
            f"first_token_time={fmt(self.first_token_time)}, "
            f"last_token_time={fmt(self.last_token_time)}, "
            f"finished_time={fmt(self.finished_time)}, "
            f"time_in_queue={fmt(self.time_in_queue)})"
        )


@dataclass
class CompletionOutput:
    """One generated sequence of a request.

    index: position of the sequence in its group; text: the detokenized output (stop
    string trimmed); cumulative_logprob: sum of the chosen tokens' logprobs (None for a
    greedy request that set no SamplingParams.logprobs: its logprobs are never computed,
    as in vLLM V1); logprobs: per token a dict token_id -> logprob (None unless
    SamplingParams.logprobs was set);
    finish_reason: "stop", "length", "abort" or None while running; stop_reason: the stop
    string or stop token id that ended it (None for EOS or length).
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Union[float, None]
    logprobs: Union[list[dict[int, float]], None]
    finish_reason: Union[str, None] = None
    stop_reason: Union[int, str, None] = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        cum = "None" if self.cumulative_logprob is None else f"{self.cumulative_logprob:.4f}"
        lp = "None" if self.logprobs is None else f"[{len(self.logprobs)} steps]"
        return (
            f"CompletionOutput(index={self.index}, text={self.text!r}, "
            f"token_ids={self.token_ids}, cumulative_logprob={cum}, logprobs={lp}, "
            f"finish_reason={self.finish_reason!r}, stop_reason={self.stop_reason!r})"
        )


@dataclass
class RequestOutput:
    """Everything one request has produced so far (finished = no sequence still runs)."""

    request_id: str
    prompt: Union[str, None]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Union[RequestMetrics, None] = None
    num_cached_tokens: Union[int, None] = None
    #: per prompt token, {token: logprob} for it and the top others (None for the first
    #: token); None unless SamplingParams.prompt_logprobs was set
    prompt_logprobs: Union[list[Union[dict[int, float], None]], None] = None

    @classmethod
    def from_seq_group(cls, group: "SequenceGroup") -> "RequestOutput":
        """The n best sequences of `group` (all of them when it holds n or fewer).

        Ranked by cumulative logprob (best_of, vLLM semantics) or, for beam search, by
        `Sequence.get_beam_search_score(length_penalty)`; ties keep group order.
        """
        params = group.sampling_params
        seqs = group.get_seqs()
        top = seqs
        if len(seqs) > params.n:
            if params.use_beam_search:
                def key(s):  # noqa: E306
                    return s.get_beam_search_score(params.length_penalty)
            else:
                def key(s):  # noqa: E306
                    return s.cumulative_logprob
            top = sorted(seqs, key=key, reverse=True)[: params.n]
        # whether or not the runner skipped its logits (BatchItem.argmax_only) this time
        unreported = params.is_greedy and params.logprobs is None
        outputs = [
            CompletionOutput(
                index=seqs.index(seq),
                text=seq.output_text,
                token_ids=list(seq.output_token_ids),
                cumulative_logprob=None if unreported else seq.cumulative_logprob,
                logprobs=(None if seq.output_logprobs is None
                          else [dict(d) for d in seq.output_logprobs]),
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
            )
            for seq in top
        ]
        return cls(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,     # never mutated: shared, not copied
            outputs=outputs,
            finished=group.is_finished(),
            metrics=dataclasses.replace(group.metrics),
            num_cached_tokens=group.num_cached_tokens,
            # its dicts are never changed once written: copy the list, share the dicts
            prompt_logprobs=(None if group.prompt_logprobs is None
                             else list(group.prompt_logprobs)),
        )

    def __repr__(self) -> str:
        outs = ",\n    ".join(repr(o) for o in self.outputs)
        return (
            f"RequestOutput(request_id={self.request_id!r}, prompt={self.prompt!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, finished={self.finished}, "
            f"num_cached_tokens={self.num_cached_tokens},\n  outputs=[\n    {outs}],\n"
            f"  metrics={self.metrics!r})"
        )
