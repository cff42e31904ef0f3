"""Logits processing: what a request's SamplingParams do to its row of logits before a
token is chosen (paper section 4.4; vLLM v0's order and definitions).

In order: min_tokens (EOS and stop_token_ids get -inf until min_tokens outputs exist;
EOS is left alone with ignore_eos), penalties (repetition over prompt + output, HF /
CTRL: a seen token's positive logit is divided by the penalty, a negative one multiplied;
presence and frequency over the output only, OpenAI: logit -= frequency * count +
presence * [count > 0]), temperature (greedy and beam rows use 1), top-k (ties with the
k-th logit are kept), top-p (the smallest set of most likely tokens whose mass reaches
p), min-p (drop tokens below min_p times the top probability). Removed tokens get -inf.

Invariant: each row is processed on its own: its result never depends on the other
rows of the batch (the steps are vectorised over rows, never mixed across them).
"""

from __future__ import annotations

from collections.abc import Collection
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from minipaged.sampling import SamplingParams, SamplingType

if TYPE_CHECKING:
    from minipaged.sampler import SamplingRow

RANDOM_TYPES = (SamplingType.RANDOM, SamplingType.RANDOM_SEED)
#: top-p first looks for its cut among this many most likely tokens (cheap), and sorts
#: the whole vocabulary only for rows whose top-K mass is still below p
TOP_P_CANDIDATES = 256


def process_logits(
    logits: torch.Tensor, rows: Seq["SamplingRow"], eos_token_ids: Collection[int] = ()
) -> torch.Tensor:
    """The processed float32 logits of a batch: a new tensor, or `logits` itself when it
    is float32 and no row needs any processing (never modify the result in place)."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(
            f"logits must be [num_rows={len(rows)}, vocab], got {tuple(logits.shape)}."
        )
    if not any(_needs_processing(r) for r in rows):
        return logits.to(torch.float32)
    x = logits.to(torch.float32, copy=True)
    _mask_until_min_tokens(x, rows, eos_token_ids)
    _apply_penalties(x, rows)
    temps = [r.params.temperature if r.params.sampling_type in RANDOM_TYPES else 1.0 for r in rows]
    if any(t != 1.0 for t in temps):
        x.div_(torch.tensor(temps, dtype=x.dtype, device=x.device)[:, None])
    _apply_top_k(x, rows)
    _apply_top_p(x, rows)
    _apply_min_p(x, rows)
    return x


def argmax_suffices(params: SamplingParams, num_output_tokens: int) -> bool:
    """Whether a row's token is the plain argmax of its raw logits and nothing else of them
    is wanted: greedy, one sample, no processing, no logprobs. The model runner then
    returns the token itself (BatchItem.argmax_only), without the full logits."""
    return (params.sampling_type == SamplingType.GREEDY and params.logprobs is None
            and params.best_of == 1 and not _params_need_processing(params, num_output_tokens))


def _needs_processing(r: "SamplingRow") -> bool:
    return _params_need_processing(r.params, len(r.output_token_ids))


def _params_need_processing(p: SamplingParams, num_output_tokens: int) -> bool:
    return (
        num_output_tokens < p.min_tokens
        or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0
        or (p.sampling_type in RANDOM_TYPES and p.temperature != 1.0)
        or p.top_k != -1 or p.top_p < 1.0 or p.min_p > 0.0
    )


def _mask_until_min_tokens(x: torch.Tensor, rows, eos_token_ids) -> None:
    vocab = x.shape[1]
    row_idx, col_idx = [], []
    for i, r in enumerate(rows):
        if len(r.output_token_ids) < r.params.min_tokens:
            banned = set(r.params.stop_token_ids)
            if not r.params.ignore_eos:
                banned.update(eos_token_ids)
            banned = [t for t in banned if t < vocab]
            row_idx += [i] * len(banned)
            col_idx += banned
    if row_idx:
        rows_t = torch.tensor(row_idx, device=x.device)
        x[rows_t, torch.tensor(col_idx, device=x.device)] = -torch.inf


def _rows_where(rows: Seq["SamplingRow"], pred: Callable[[SamplingParams], bool]) -> list[int]:
    return [i for i, r in enumerate(rows) if pred(r.params)]


def _apply_penalties(x: torch.Tensor, rows: Seq["SamplingRow"]) -> None:
    """Penalise the tokens each row has seen. Sparse: only the (row, token) pairs of the
    rows' distinct prompt and output tokens are gathered, changed and written back."""
    parts = []  # per row: row index, distinct seen ids, output count of each, params
    for i, r in enumerate(rows):
        p = r.params
        if p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 and p.repetition_penalty == 1.0:
            continue
        out_ids, out_counts = np.unique(np.asarray(r.output_token_ids, dtype=np.int64),
                                        return_counts=True)
        seen = np.union1d(np.asarray(r.prompt_token_ids, dtype=np.int64), out_ids)
        n_out = np.zeros(len(seen))
        n_out[np.searchsorted(seen, out_ids)] = out_counts
        in_vocab = seen < x.shape[1]
        parts.append((i, seen[in_vocab], n_out[in_vocab], p))
    if not parts:
        return

    def flat(f):
        return torch.from_numpy(np.concatenate([f(*part) for part in parts])).to(x.device)

    row_ids = flat(lambda i, seen, n, p: np.full(len(seen), i))
    tok_ids = flat(lambda i, seen, n, p: seen)
    n_out = flat(lambda i, seen, n, p: n).to(x.dtype)
    rep, freq, pres = (
        flat(lambda i, seen, n, p, a=a: np.full(len(seen), getattr(p, a))).to(x.dtype)
        for a in ("repetition_penalty", "frequency_penalty", "presence_penalty"))
    v = x[row_ids, tok_ids]
    # HF / CTRL: a seen token's logit moves towards -inf whatever its sign
    v = torch.where(v > 0, v / rep, v * rep)
    # OpenAI: frequency per occurrence in the output, presence once if it occurs there
    v = v - freq * n_out - pres * (n_out > 0).to(x.dtype)
    x[row_ids, tok_ids] = v


def _apply_top_k(x: torch.Tensor, rows: Seq["SamplingRow"]) -> None:
    idx = _rows_where(rows, lambda p: 0 < p.top_k < x.shape[1])
    if not idx:
        return
    ks = torch.tensor([rows[i].params.top_k for i in idx], device=x.device)
    sub = x[idx]
    kth = sub.topk(int(ks.max()), dim=-1).values.gather(1, (ks - 1)[:, None])
    x[idx] = sub.masked_fill(sub < kth, -torch.inf)  # ties with the k-th are kept


def _apply_top_p(x: torch.Tensor, rows: Seq["SamplingRow"]) -> None:
    """Keep, per row, the smallest set of most likely tokens whose mass reaches top_p: a
    token stays while the mass of the strictly more likely tokens is below p."""
    idx = _rows_where(rows, lambda p: p.top_p < 1.0)
    if not idx:
        return
    ps = torch.tensor([rows[i].params.top_p for i in idx], device=x.device)[:, None]
    sub = x[idx]
    k = min(TOP_P_CANDIDATES, sub.shape[1])
    # First pass: the cut usually falls among the K most likely tokens. If the top-K
    # mass reaches p, every token outside the top K has mass-before >= p and goes.
    probs = sub.softmax(dim=-1)
    top_probs, top_ids = probs.topk(k, dim=-1)
    cumulative = top_probs.cumsum(dim=-1)
    before = _shift_right(cumulative)
    found = (cumulative[:, -1:] >= ps).squeeze(1) | (k == sub.shape[1])
    keep = torch.zeros_like(sub, dtype=torch.bool)
    keep.scatter_(1, top_ids, before < ps)
    if not bool(found.all()):  # second pass, the whole vocabulary, for the flat rows
        rest = torch.nonzero(~found).flatten()
        sorted_probs, order = probs[rest].sort(dim=-1, descending=True)
        before = _shift_right(sorted_probs.cumsum(dim=-1))
        keep[rest] = torch.zeros_like(before, dtype=torch.bool).scatter_(
            1, order, before < ps[rest])
    x[idx] = sub.masked_fill(~keep, -torch.inf)


def _shift_right(cumulative: torch.Tensor) -> torch.Tensor:
    """Exclusive cumulative sums: the mass strictly before each position."""
    return torch.nn.functional.pad(cumulative[:, :-1], (1, 0))


def _apply_min_p(x: torch.Tensor, rows: Seq["SamplingRow"]) -> None:
    idx = _rows_where(rows, lambda p: p.min_p > 0.0)
    if not idx:
        return
    mins = torch.tensor([rows[i].params.min_p for i in idx], device=x.device)[:, None]
    sub = x[idx]
    probs = sub.softmax(dim=-1)
    x[idx] = sub.masked_fill(probs < mins * probs.max(dim=-1, keepdim=True).values, -torch.inf)
