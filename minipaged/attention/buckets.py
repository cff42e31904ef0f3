"""Length buckets for the gather + SDPA path: which sequences of a batch are padded
together, and the block ids, masks and row maps each bucket needs.

Paper section 4.1 (Fig. 5/6) without a custom kernel: torch_backend.py gathers each
sequence's blocks into a padded, contiguous workspace and calls SDPA on it. Padding
every sequence to the batch's longest context wastes rows, so the batch is sorted by
context and cut into a few buckets, each padded only to its own longest context. A
dynamic program picks the cuts, weighing the rows padding wastes against the fixed cost
of one more call.

A step's plan depends only on the block tables, the context lengths (and, for a
prefill, where each sequence's queries start), which every layer of a step shares: the
backend builds it once per step and reuses it.

Invariant: every sequence is in exactly one bucket, and a bucket's `invalid_rows` are
exactly the workspace rows past each member's context (the rows that must be zeroed
before attention: NaN is allowed in the cache there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

#: What one more decode bucket costs, in gathered rows of padding it would have to save:
#: a bucket is ~6 torch calls (~100-150 us with their dispatch) and a padded row costs
#: ~0.5 us to gather, zero and attend over (SmolLM2 shapes, fp32, measured on 1 thread).
BUCKET_OVERHEAD_ROWS = 256
#: The same for a prefill bucket, in (query, key) pairs of causal attention (~80 ns each).
PREFILL_BUCKET_OVERHEAD_PAIRS = 4096


def plan_buckets(widths: np.ndarray, cost: Callable[[np.ndarray], np.ndarray],
                 overhead: float) -> list[np.ndarray]:
    """Cut a batch into buckets of similar length: arrays of sequence indices.

    widths[i] is how many KV blocks sequence i reads. A bucket is padded to its widest
    sequence, so it costs len(bucket) * cost(widest) + overhead; a dynamic program over
    the sorted distinct widths finds the cuts of least total cost. Every sequence is in
    exactly one bucket; the widest bucket comes first.
    """
    order = np.argsort(-widths, kind="stable")
    distinct, counts = np.unique(-widths[order], return_counts=True)
    distinct = -distinct                            # distinct widths, descending
    unit = cost(distinct)
    cum = np.concatenate(([0], np.cumsum(counts)))
    k = len(distinct)
    best = np.zeros(k + 1)
    cut = np.zeros(k + 1, dtype=np.int64)
    for j in range(1, k + 1):
        # the last bucket holds width groups i..j-1 (any i < j), padded to distinct[i]
        i = np.arange(j)
        total = best[i] + (cum[j] - cum[i]) * unit[i] + overhead
        cut[j] = int(np.argmin(total))
        best[j] = total[cut[j]]
    bounds, j = [], k
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    return [order[cum[i]:cum[j]] for i, j in reversed(bounds)]


@dataclass
class Bucket:
    """One bucket of a step's plan, as tensors ready for the gather and the attention."""

    rows: torch.Tensor | None           # decode: its sequences' rows; None = all, in order
    num_seqs: int
    num_blocks: int                     # blocks gathered per sequence (the bucket's widest)
    block_ids: torch.Tensor             # [num_seqs * num_blocks] long
    invalid_rows: torch.Tensor | None   # rows of the [num_seqs * width] workspace to zero
    mask: torch.Tensor | None           # decode [n, 1, 1, width]; prefill [n, 1, Q, width]
    # prefill only: queries packed as [n, max_query_len]; the packed rows that are real
    # tokens, and those tokens' rows in the batch
    max_query_len: int = 1
    pack_index: torch.Tensor | None = None      # [n * Q] batch row of each packed row
    packed_rows: torch.Tensor | None = None     # packed rows that hold a real token
    token_rows: torch.Tensor | None = None      # ... and that token's row in the batch
    causal: bool = False                         # SDPA's own (top-left) causal mask suffices


def blocks_and_invalid(tables: np.ndarray, ctx: np.ndarray, members: np.ndarray,
                        block_size: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(blocks per sequence, their ids [n * blocks], invalid [n, width]) of a bucket."""
    c = ctx[members]
    num_blocks = int(-(-c.max() // block_size))
    ids = tables[members, :num_blocks].reshape(-1).astype(np.int64)
    invalid = np.arange(num_blocks * block_size)[None, :] >= c[:, None]
    return num_blocks, ids, invalid


def decode_buckets(block_tables: torch.Tensor, context_lens: torch.Tensor,
                   block_size: int) -> list[Bucket]:
    """A decode batch's buckets (one query per sequence); a single bucket keeps the
    batch's own order (rows None)."""
    device = block_tables.device
    ctx = context_lens.cpu().numpy().astype(np.int64)
    tables = block_tables.cpu().numpy()
    groups = plan_buckets(-(-ctx // block_size), lambda w: w * block_size,
                          BUCKET_OVERHEAD_ROWS)
    if len(groups) == 1:
        groups = [np.arange(len(ctx))]     # one bucket: keep the batch's own order
    buckets = []
    for members in groups:
        num_blocks, ids, invalid = blocks_and_invalid(tables, ctx, members, block_size)
        inv_rows = np.flatnonzero(invalid)
        buckets.append(Bucket(
            rows=(None if len(groups) == 1
                  else torch.from_numpy(members.copy()).to(device)),
            num_seqs=len(members), num_blocks=num_blocks,
            block_ids=torch.from_numpy(ids).to(device),
            invalid_rows=torch.from_numpy(inv_rows).to(device) if inv_rows.size else None,
            mask=(torch.from_numpy(~invalid).to(device)[:, None, None, :]
                  if inv_rows.size else None)))
    return buckets


def prefill_buckets(block_tables: torch.Tensor, context_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, block_size: int) -> list[Bucket]:
    """A prefill batch's buckets: each sequence's new tokens (rows query_start_loc[i] ..
    query_start_loc[i+1] - 1) are packed into a [n, max_query_len] block of queries."""
    device = block_tables.device
    ctx = context_lens.cpu().numpy().astype(np.int64)
    tables = block_tables.cpu().numpy()
    starts = query_start_loc.cpu().numpy().astype(np.int64)
    qlens = starts[1:] - starts[:-1]
    widths = -(-ctx // block_size)
    groups = plan_buckets(widths, lambda w: (w * block_size) ** 2 / 2,
                          PREFILL_BUCKET_OVERHEAD_PAIRS)
    buckets = []
    for members in groups:
        num_blocks, ids, invalid = blocks_and_invalid(tables, ctx, members, block_size)
        q_len, c = qlens[members], ctx[members]
        max_q = int(q_len.max())
        j = np.arange(max_q)
        real = j[None, :] < q_len[:, None]                    # [n, Q]
        # padded rows repeat the sequence's first token: finite, then dropped
        pack = starts[members][:, None] + np.where(real, j[None, :], 0)
        fresh = bool((q_len == c).all())
        if fresh:
            # query j is position j: SDPA's is_causal is the exact mask, and it
            # skips the blocks above the diagonal (~2.5x faster at 2048 tokens).
            # Padded rows (j >= q_len) see at least key 0, never a NaN: the
            # invalid rows are zeroed; their outputs are dropped.
            mask = None
        else:
            # a cached prefix: token j sits at position ctx - q_len + j and sees
            # positions 0..that (bottom-right aligned); padded rows see key 0
            q_pos = (c - q_len)[:, None] + j[None, :]
            mask = (np.arange(num_blocks * block_size)[None, None, :]
                    <= np.maximum(q_pos, 0)[:, :, None]) & ~invalid[:, None, :]
            mask = torch.from_numpy(mask).to(device)[:, None]
        inv_rows = np.flatnonzero(invalid)
        buckets.append(Bucket(
            rows=None, num_seqs=len(members), num_blocks=num_blocks,
            block_ids=torch.from_numpy(ids).to(device),
            invalid_rows=torch.from_numpy(inv_rows).to(device) if inv_rows.size else None,
            mask=mask, max_query_len=max_q,
            pack_index=torch.from_numpy(pack.reshape(-1)).to(device),
            packed_rows=torch.from_numpy(np.flatnonzero(real)).to(device),
            token_rows=torch.from_numpy(pack[real]).to(device), causal=fresh))
    return buckets
