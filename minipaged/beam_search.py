"""Beam search over paged sequences (paper section 4.4, Fig. 9; vLLM v0 semantics).

Each step, for one request of beam width W: every live beam's candidates are scored by
cumulative logprob, the best 2W over all beams are taken, candidates that finish (EOS,
a stop token or string, max_tokens, a full context) become finished hypotheses scored
with the length penalty, the best W hypotheses are kept, and the best W unfinished
candidates live on, unless the search can stop (early_stopping: True stops once W
hypotheses exist; False, HF's heuristic, when the worst kept hypothesis scores at least
the best live beam's current score; "never" against the best score it could still reach).

The paging consequence is the paper's Fig. 9: a kept candidate is its parent plus one
token, so it *forks* the parent's block table (sharing every block, copy-on-write on the
partly filled last one), and a parent with no kept candidate is *freed*. This module
only decides; it returns plain data (which forks, which frees) for the engine to apply
to the block manager.

Invariant: after a step the group's RUNNING sequences are exactly the next live beams
(at most W, all of the same length) and its finished sequences are the at most W best
hypotheses; finished hypotheses never own KV blocks.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus
from minipaged.stop import check_stop


@dataclass(frozen=True)
class NewBeam:
    """A kept candidate: `seq_id == parent_seq_id` when the parent itself continues."""

    parent_seq_id: int
    seq_id: int
    token_id: int
    cumulative_logprob: float
    finished: bool


@dataclass
class BeamSearchStep:
    """What one step decided, for the engine to apply to the block manager.

    forks: (parent_seq_id, child_seq_id) pairs: call block_manager.fork(parent, child).
    freed: live parents without a kept live candidate; already marked FINISHED_ABORTED
        and removed from the group: call block_manager.free on them.
    removed: earlier hypotheses pushed out of the best W; removed from the group (they
        own no blocks). done: the search is over, the group holds only its hypotheses.
    """

    beams: list[NewBeam] = field(default_factory=list)
    forks: list[tuple[int, int]] = field(default_factory=list)
    freed: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    done: bool = False


def beam_search_step(
    group: SequenceGroup,
    parents: Seq[Sequence],
    logprobs: torch.Tensor,
    next_seq_id: Callable[[], int],
    *,
    stop_checker: Union[Callable[[Sequence], Union[SequenceStatus, None]], None] = None,
    max_model_len: Union[int, None] = None,
) -> BeamSearchStep:
    """Advance `group`'s beam search by one token.

    parents: the group's live beams, in the order of the rows of `logprobs`
    ([len(parents), vocab], the sampler's log-softmax; any float dtype, ranked in float64).
    stop_checker(child) must set child.status when the child (its parent plus the new
    token, text updated by the checker if it tracks text) is finished, and return it;
    by default `check_stop` without text (EOS, stop token ids, max_tokens, context).
    """
    params = group.sampling_params
    if not params.use_beam_search:
        raise ValueError("group must use beam search (sampling_params.use_beam_search).")
    if logprobs.dim() != 2 or logprobs.shape[0] != len(parents) or not parents:
        raise ValueError(f"logprobs must be [len(parents)={len(parents)}, vocab], "
                         f"got {tuple(logprobs.shape)}.")
    for p in parents:
        if group.seqs_dict.get(p.seq_id) is not p or p.is_finished():
            raise ValueError(
                f"parent {p.seq_id} is not a live beam of request {group.request_id!r}.")
    if stop_checker is None:
        def stop_checker(seq: Sequence) -> Union[SequenceStatus, None]:
            return check_stop(seq, params, None, max_model_len)

    width = params.beam_width
    children, parent_of = _expand(parents, logprobs, 2 * width, params.logprobs)
    for child in children:
        stop_checker(child)

    def score(seq: Sequence) -> float:
        return seq.get_beam_search_score(params.length_penalty)

    # Hypotheses: the earlier ones first, then the new ones; a stable sort keeps that
    # order among equal scores.
    all_finished = [(s, False) for s in group.get_finished_seqs()]
    all_finished += [(c, True) for c in children if c.is_finished()]
    all_finished.sort(key=lambda pair: score(pair[0]), reverse=True)
    running = sorted((c for c in children if not c.is_finished()), key=score, reverse=True)

    if not running:
        done = True
    elif len(all_finished) < width:
        done = False
    else:
        done = _can_stop(params, running[0], all_finished[width - 1][0], max_model_len)

    step = BeamSearchStep(done=done)
    for seq, is_new in all_finished[width:]:
        if not is_new:
            group.remove(seq.seq_id)
            step.removed.append(seq.seq_id)
    for seq, is_new in all_finished[:width]:
        if is_new:
            seq.seq_id = next_seq_id()
            group.add(seq)
            step.beams.append(_new_beam(parent_of[id(seq)], seq, True))

    continued: set[int] = set()
    for child in [] if done else running[:width]:
        parent = parent_of[id(child)]
        if parent.seq_id not in continued:
            # The parent itself continues (its blocks are reused, no fork): it takes the
            # child's state, keeping its id and object identity.
            continued.add(parent.seq_id)
            _take_over(parent, child)
            step.beams.append(_new_beam(parent, parent, False))
        else:
            child.seq_id = next_seq_id()
            group.add(child)
            step.forks.append((parent.seq_id, child.seq_id))
            step.beams.append(_new_beam(parent, child, False))
    for parent in parents:
        if parent.seq_id not in continued:
            parent.status = SequenceStatus.FINISHED_ABORTED
            group.remove(parent.seq_id)
            step.freed.append(parent.seq_id)
    return step


def _expand(parents, logprobs, k, num_logprobs):
    """The best k (parent, token) candidates by parent cumulative logprob + token
    logprob, best first, ties by parent then token; each as a provisional fork."""
    lp = logprobs.detach().to("cpu", torch.float64)
    vocab = lp.shape[1]
    cum = torch.tensor([p.cumulative_logprob for p in parents], dtype=torch.float64)
    scores = (lp + cum[:, None]).flatten()
    k = min(k, int(torch.isfinite(scores).sum()))  # -inf: tokens masked by the sampler
    if k == 0:
        return [], {}
    threshold = scores.topk(k).values[-1]
    idx = torch.nonzero(scores >= threshold).flatten().tolist()  # k, or more on ties
    vals = scores[idx].tolist()
    best = sorted(zip(idx, vals), key=lambda iv: (-iv[1], iv[0]))[:k]
    top: dict[int, dict[int, float]] = {}
    if num_logprobs:
        v, t = lp.topk(min(num_logprobs, vocab), dim=-1)
        top = {r: dict(zip(t[r].tolist(), v[r].tolist())) for r in range(len(parents))}
    children, parent_of = [], {}
    for j, _ in best:
        r, token = divmod(j, vocab)
        child = parents[r].fork(-1)  # provisional id: assigned only if the child is kept
        d = dict(top.get(r, {}))
        d[token] = float(lp[r, token])
        child.append_token(token, d)
        children.append(child)
        parent_of[id(child)] = parents[r]
    return children, parent_of


def _can_stop(params, best_running: Sequence, worst_kept: Sequence, max_model_len) -> bool:
    """vLLM's _check_beam_search_early_stopping: can no live beam beat the worst kept
    hypothesis?"""
    if params.early_stopping is True:
        return True
    lp = params.length_penalty
    worst = worst_kept.get_beam_search_score(lp)
    if params.early_stopping == "never" and lp > 0.0:
        # a longer beam scores higher with a positive penalty: bound by the longest
        max_len = max(best_running.get_prompt_len() + (params.max_tokens or 0), max_model_len or 0)
        best = best_running.get_beam_search_score(lp, seq_len=max_len)
    else:
        best = best_running.get_beam_search_score(lp)
    return worst >= best


def _take_over(parent: Sequence, child: Sequence) -> None:
    seq_id = parent.seq_id
    parent.__dict__.update(child.__dict__)
    parent.seq_id = seq_id


def _new_beam(parent: Sequence, seq: Sequence, finished: bool) -> NewBeam:
    return NewBeam(parent.seq_id, seq.seq_id, seq.last_token_id, seq.cumulative_logprob, finished)
