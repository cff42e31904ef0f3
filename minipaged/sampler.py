"""The sampler: from the last position's logits to the next token of every running
sequence (paper section 4.4 and vLLM v0's Sampler), plus the fork that starts parallel
sampling.

One call handles the whole batch: the logits are processed per row
(`minipaged.logits_processing`: min_tokens, penalties, temperature, top-k/p, min-p),
then greedy rows take the argmax and random rows draw by inverting the CDF with one
uniform number per draw, from the request's own generator when it is seeded. Logprobs
are the log-softmax of the *processed* logits (vLLM v0's choice: the temperature is
applied and tokens cut by top-k/p/min-p are -inf; greedy and beam rows see the
penalised logits at temperature 1).

Invariant: a row's result depends only on that row (its logits, params, tokens and, for
a seeded request, its own generator), never on what else is in the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Callable, Union

import torch

from minipaged.kernels import cpu_layers
from minipaged.logits_processing import RANDOM_TYPES, process_logits
from minipaged.sampling import SamplingParams, SamplingType
from minipaged.sequence import Sequence, SequenceGroup


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    prompt_token_ids: Seq[int]
    output_token_ids: Seq[int]
    generator: Union[torch.Generator, None] = None  # the request's (CPU), when seeded
    num_samples: int = 1                              # best_of draws after a prefill

    @classmethod
    def for_seq(cls, group: SequenceGroup, seq: Sequence) -> "SamplingRow":
        """The row of `seq`: best_of independent samples if it is the single sequence
        of a best_of > 1 request that has not sampled yet (just prefilled), else one."""
        params = group.sampling_params
        first_of_many = (
            not params.use_beam_search and params.best_of > 1 and seq.get_output_len() == 0
        )
        return cls(params, seq.prompt_token_ids, seq.output_token_ids, group.generator,
                   params.best_of if first_of_many else 1)


@dataclass(frozen=True)
class Sample:
    """One drawn token: its logprob, and the dict handed to Sequence.append_token (the
    chosen token plus the top-`logprobs` tokens when the request asked for them)."""

    token_id: int
    logprob: float
    logprobs: dict[int, float]


@dataclass
class SamplerOutput:
    """samples: per row, num_samples Samples (none for beam-search rows).
    processed: [num_rows, vocab] float32 processed logits (may be the input tensor
    itself when no row needed processing; never modify it)."""

    samples: list[list[Sample]]
    processed: torch.Tensor

    @functools.cached_property
    def logprobs(self) -> torch.Tensor:
        """[num_rows, vocab] log-softmax of the processed logits (computed on first use)."""
        return torch.log_softmax(self.processed, dim=-1)

    def row_logprobs(self, rows: Seq[int]) -> torch.Tensor:
        """The log-softmax of some rows only (what beam search needs)."""
        return torch.log_softmax(self.processed[list(rows)], dim=-1)


class Sampler:
    """Turns a batch of logits into tokens. eos_token_ids: masked while min_tokens is not
    reached. seed: seeds the generator of unseeded random rows (None: nondeterministic)."""

    def __init__(self, eos_token_ids: Collection[int] = (), seed: Union[int, None] = None):
        self.eos_token_ids = sorted(set(int(t) for t in eos_token_ids))
        self.seed = seed
        # uniforms are drawn on the CPU (a few per row) so that results do not depend
        # on the device's random number generator
        self._generator = torch.Generator()
        if seed is not None:
            self._generator.manual_seed(seed)
        else:
            self._generator.seed()

    def process_logits(self, logits: torch.Tensor, rows: Seq[SamplingRow]) -> torch.Tensor:
        """See `minipaged.logits_processing.process_logits`."""
        return process_logits(logits, rows, self.eos_token_ids)

    # -- sampling ---------------------------------------------------------------------

    def __call__(self, logits: torch.Tensor, rows: Seq[SamplingRow]) -> SamplerOutput:
        x = self.process_logits(logits, rows)
        tokens: list[list[int]] = [[] for _ in rows]
        lse: dict[int, float] = {}
        greedy = [i for i, r in enumerate(rows) if r.params.sampling_type == SamplingType.GREEDY]
        if greedy:
            g = _take_rows(x, greedy)
            # on the CPU, one C pass gives the argmax and the log-sum-exp the logprob needs
            fused = cpu_layers.argmax_logsumexp(g)
            best = fused[0] if fused is not None else g.argmax(dim=-1)
            for i, t in zip(greedy, best.tolist()):
                tokens[i] = [t]
            if fused is not None:
                lse.update(zip(greedy, fused[1].tolist()))
        drawn = [i for i, r in enumerate(rows) if r.params.sampling_type in RANDOM_TYPES]
        if drawn:
            for i, ts in zip(drawn, self._draw(_take_rows(x, drawn), [rows[i] for i in drawn])):
                tokens[i] = ts
        return SamplerOutput(_collect(x, rows, tokens, lse), x)

    def _draw(self, x: torch.Tensor, rows: Seq[SamplingRow]) -> list[list[int]]:
        """num_samples draws per row from softmax(x): the first index where the CDF
        exceeds u * total, u uniform in [0, 1) from the row's generator."""
        counts = [r.num_samples for r in rows]
        u = torch.zeros(len(rows), max(counts), dtype=torch.float64)
        for j, r in enumerate(rows):
            if r.params.sampling_type == SamplingType.RANDOM_SEED:
                if r.generator is None:
                    raise ValueError(
                        f"generator is required for a seeded row (seed={r.params.seed}).")
                g = r.generator
            else:
                g = self._generator
            u[j, : counts[j]] = torch.rand(counts[j], generator=g, dtype=torch.float64)
        cdf = (x - x.max(dim=-1, keepdim=True).values).exp_().cumsum_(dim=-1)
        target = (u.to(cdf.device) * cdf[:, -1:].double()).to(cdf.dtype)
        picked = torch.searchsorted(cdf, target, right=True).clamp_(max=x.shape[1] - 1)
        # Rounding can land a draw on the very end of the CDF (a token of probability 0
        # after it): move such draws to the last token with positive probability.
        before = torch.where(picked > 0, cdf.gather(1, (picked - 1).clamp_(min=0)), 0.0)
        bad = cdf.gather(1, picked) <= before
        if bool(bad.any()):
            last = torch.searchsorted(cdf, cdf[:, -1:], right=False).expand_as(picked)
            picked = torch.where(bad, last, picked)
        return [p[:c] for p, c in zip(picked.tolist(), counts)]


def _take_rows(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """x[idx] without a copy when idx is every row in order."""
    return x if idx == list(range(x.shape[0])) else x[torch.tensor(idx, device=x.device)]


def _collect(x: torch.Tensor, rows, tokens: list[list[int]],
             lse: dict[int, float]) -> list[list[Sample]]:
    """Samples with their logprobs: x[token] - logsumexp(x), plus the top-k when asked.
    lse: the rows' logsumexp already known (it is computed for the others)."""
    samples: list[list[Sample]] = [[] for _ in rows]
    have = [i for i, ts in enumerate(tokens) if ts]
    if not have:
        return samples
    missing = [i for i in have if i not in lse]
    if missing:
        lse.update(zip(missing, torch.logsumexp(_take_rows(x, missing), dim=-1).tolist()))
    flat = [(i, t) for i in have for t in tokens[i]]
    dev = x.device
    chosen = x[torch.tensor([i for i, _ in flat], device=dev),
               torch.tensor([t for _, t in flat], device=dev)].tolist()
    want = [i for i in have if rows[i].params.logprobs]
    top: dict[int, dict[int, float]] = {}
    if want:
        k = min(max(rows[i].params.logprobs for i in want), x.shape[1])
        vals, ids = _take_rows(x, want).topk(k, dim=-1)
        for i, v, t in zip(want, vals.tolist(), ids.tolist()):
            n = rows[i].params.logprobs
            top[i] = {tok: val - lse[i] for tok, val in zip(t[:n], v[:n])}
    for (i, t), value in zip(flat, chosen):
        lp = value - lse[i]
        d = dict(top.get(i, {}))
        d[t] = lp
        samples[i].append(Sample(t, lp, d))
    return samples


# -- parallel sampling -----------------------------------------------------------------


@dataclass(frozen=True)
class NewSequence:
    """A sequence that received a token: `seq_id == parent_seq_id` when the parent
    itself took it; otherwise a new child to fork the parent's block table into."""

    parent_seq_id: int
    seq_id: int
    token_id: int


def fork_parallel_samples(
    group: SequenceGroup,
    parent: Sequence,
    samples: Seq[Sample],
    next_seq_id: Callable[[], int],
) -> list[NewSequence]:
    """After the prefill of a best_of = k request: the parent takes samples[0] and k - 1
    children, forked from the parent *before* it appends (so they share the prompt and
    nothing else), take the others. The children join the group; the caller forks the
    parent's block table into each (block_manager.fork(parent_seq_id, seq_id)): the
    prompt's blocks are shared, paper section 4.4 / Fig. 8."""
    if not samples:
        raise ValueError("samples must hold at least one Sample.")
    if group.seqs_dict.get(parent.seq_id) is not parent:
        raise ValueError(
            f"parent {parent.seq_id} is not a sequence of request {group.request_id!r}.")
    children = [parent.fork(next_seq_id()) for _ in samples[1:]]
    result = [NewSequence(parent.seq_id, parent.seq_id, samples[0].token_id)]
    for child, sample in zip(children, samples[1:]):
        child.append_token(sample.token_id, sample.logprobs)
        group.add(child)
        result.append(NewSequence(parent.seq_id, child.seq_id, sample.token_id))
    parent.append_token(samples[0].token_id, samples[0].logprobs)
    return result
