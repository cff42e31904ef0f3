"""Prompt logprobs: how likely the model found each prompt token, given the ones before.

Not from the paper; it is vLLM's `SamplingParams.prompt_logprobs`, which evaluation
tools use to score text (perplexity, or the log-likelihood of a multiple-choice answer,
sent as an echoed prompt with `max_tokens` 1). A prefill already runs the model on every
prompt position; its logits at position i are the model's distribution over token i + 1.
The engine normally keeps only the last position's logits (the last layer computes
nothing else), so a request that asks for prompt logprobs has its other rows kept too
(`BatchItem.extra_logit_rows`), chunk by chunk when its prefill is chunked.

Such a request never reads the prefix cache, as in vLLM: a cached prefix is never run
through the model, so its positions would have no logits. Nor does it fill the cache
(the scheduler's `_take_tokens`): its blocks may twin cached ones that others read.

Invariant: `group.prompt_logprobs[t]` is the entry of prompt token t, None for t = 0
(nothing precedes it), and it is written once: a prompt computed again after a
preemption (recompute) adds nothing that is already there.
"""

from __future__ import annotations

from typing import Iterable, Union

import torch

from minipaged.sequence import SequenceGroup

#: rows whose log-sum-exp is taken at once: bounds the temporaries of a long prompt
CHUNK_ROWS = 256

PromptLogprobs = list[Union[dict[int, float], None]]


def extra_rows(group: SequenceGroup, start: int, num_new_tokens: int) -> int:
    """How many of the rows a step computes for one of `group`'s sequences, from position
    `start` on, give prompt logprobs: those at positions up to prompt_len - 2 (the
    last prompt position predicts the first output token, which is sampled instead)."""
    if group.sampling_params.prompt_logprobs is None:
        return 0
    last = len(group.prompt_token_ids) - 2
    return max(0, min(num_new_tokens, last - start + 1))


def record(chunks: Iterable[tuple[SequenceGroup, int, int]], logits: torch.Tensor) -> None:
    """Append the prompt logprobs of one step: `logits` holds, in order, each chunk's
    rows, where a chunk is (group, start position, number of rows). Row j of a chunk
    predicts prompt token start + j + 1."""
    at = 0
    for group, start, rows in chunks:
        if rows == 0:
            continue
        block, at = logits[at:at + rows], at + rows
        entries = group.prompt_logprobs
        first = len(entries) - (start + 1)      # rows whose token already has an entry
        if first >= rows:
            continue
        targets = group.prompt_token_ids[start + 1:start + 1 + rows]
        entries.extend(_entries(block[max(first, 0):], targets[max(first, 0):],
                                group.sampling_params.prompt_logprobs))


def _entries(logits: torch.Tensor, targets: list[int], top: int) -> PromptLogprobs:
    """Per row: {target: its logprob} plus the `top` most likely tokens' logprobs."""
    out: PromptLogprobs = []
    for r0 in range(0, len(targets), CHUNK_ROWS):
        x = logits[r0:r0 + CHUNK_ROWS].float()
        want = targets[r0:r0 + CHUNK_ROWS]
        lse = torch.logsumexp(x, dim=-1)
        chosen = (x[torch.arange(len(want)), torch.tensor(want)] - lse).tolist()
        if top:
            vals, ids = x.topk(min(top, x.shape[1]), dim=-1)
            tops = zip((vals - lse[:, None]).tolist(), ids.tolist())
        else:
            tops = (([], []) for _ in want)
        for t, lp, (tv, ti) in zip(want, chosen, tops):
            d = dict(zip(ti, tv))
            d[t] = lp
            out.append(d)
    return out
