"""The one attention interface every model layer calls (paper section 4.1, Fig. 5/6).

A model layer never sees a per-request contiguous KV cache. It hands its new keys and
values to `forward`, which (1) writes them into the paged cache through the slot
mapping and (2) attends from each new query token over that sequence's whole context,
read through its block table.

Invariant: for sequence i, `context_lens[i]` counts every token of the sequence whose
K/V is in the cache *after* this step's write, and its new (query) tokens are the last
`query_start_loc[i+1] - query_start_loc[i]` of them. So a query at position p attends
to positions 0..p: a full prefill, a prefill after a prefix-cache hit, a chunk of a
chunked prefill and a one-token decode are the same computation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """The batch tensors the model runner builds once per step (shared by all layers).

    Attributes:
        slot_mapping: [num_tokens] int64, the cache slot (block * B + offset) each new
            token's K/V goes to; -1 means "do not write" (padding).
        block_tables: [num_seqs, max_blocks] int32, physical block ids, padded with 0.
        context_lens: [num_seqs] int32, tokens in the cache after this step, per sequence.
        query_start_loc: [num_seqs + 1] int32, cumulative count of new tokens; the new
            tokens of sequence i are rows query_start_loc[i]:query_start_loc[i+1].
        max_query_len: the longest run of new tokens in the batch (1 = pure decode).
        max_context_len: the longest context in the batch.
        num_decode_seqs: the first num_decode_seqs sequences bring exactly one new token
            each (rows 0..num_decode_seqs-1); the model runner orders decodes first so
            that a mixed batch runs the decode kernel on them and the prefill kernel on
            the rest, instead of padding every decode to the longest prefill.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    max_context_len: int
    num_decode_seqs: int = 0

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def is_decode(self) -> bool:
        """True when every sequence brings exactly one new token."""
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Paged attention, cache writes and block copies for one kind of device/kernel.

    All tensors use the layout of DESIGN.md section 3:
    key_cache / value_cache: [num_blocks, block_size, num_kv_heads, head_dim].
    """

    name: str = "base"

    @abstractmethod
    def reshape_and_cache(self, key: torch.Tensor, value: torch.Tensor,
                          key_cache: torch.Tensor, value_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
        """Write key/value [num_tokens, num_kv_heads, head_dim] into their slots."""

    @abstractmethod
    def paged_attention_decode(self, query: torch.Tensor, key_cache: torch.Tensor,
                               value_cache: torch.Tensor, block_tables: torch.Tensor,
                               context_lens: torch.Tensor, scale: float) -> torch.Tensor:
        """query [num_seqs, num_heads, head_dim] -> out [num_seqs, num_heads, head_dim]."""

    @abstractmethod
    def paged_attention_prefill(self, query: torch.Tensor, key_cache: torch.Tensor,
                                value_cache: torch.Tensor, block_tables: torch.Tensor,
                                context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                                scale: float, max_query_len: int | None = None) -> torch.Tensor:
        """query [num_tokens, num_heads, head_dim] (ragged, causal) -> same shape."""

    @abstractmethod
    def copy_blocks(self, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: copy block src to block dst in both caches, for each pair."""

    @abstractmethod
    def swap_blocks(self, src_cache: torch.Tensor, dst_cache: torch.Tensor,
                    pairs: list[tuple[int, int]]) -> None:
        """Copy block src of src_cache to block dst of dst_cache (device <-> host)."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """One attention layer's paged step: write the new K/V, then attend.

        query [num_tokens, num_heads, head_dim]; key, value [num_tokens, num_kv_heads,
        head_dim]; returns [num_tokens, num_heads, head_dim], or with `rows` only those
        rows' outputs (`forward_rows`).
        """
        if rows is not None:
            return self.forward_rows(query, key, value, key_cache, value_cache, meta, scale,
                                     rows)
        self.reshape_and_cache(key, value, key_cache, value_cache, meta.slot_mapping)
        if meta.is_decode:
            return self.paged_attention_decode(query, key_cache, value_cache,
                                               meta.block_tables, meta.context_lens, scale)
        d = meta.num_decode_seqs
        if d == 0:
            return self.paged_attention_prefill(query, key_cache, value_cache,
                                                meta.block_tables, meta.context_lens,
                                                meta.query_start_loc, scale, meta.max_query_len)
        # A mixed batch: decodes (one row each, first) and prefills (the rest) separately.
        out = torch.empty_like(query)
        out[:d] = self.paged_attention_decode(query[:d], key_cache, value_cache,
                                              meta.block_tables[:d], meta.context_lens[:d],
                                              scale)
        out[d:] = self.paged_attention_prefill(query[d:], key_cache, value_cache,
                                               meta.block_tables[d:], meta.context_lens[d:],
                                               meta.query_start_loc[d:] - d, scale,
                                               meta.max_query_len)
        return out

    def forward_rows(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     key_cache: torch.Tensor, value_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float, rows: torch.Tensor
                     ) -> torch.Tensor:
        """`forward` for a model's last layer, whose output only `rows` will read.

        Every new token's K/V is written (later steps attend to them), but only the
        tokens in `rows` (int64, sorted, into the batch's rows) attend. Each of them is
        one query over its own prefix of its sequence, which is what the decode kernel
        computes: a prompt's last token attends like a decode step of the whole prompt.
        Returns [len(rows), num_heads, head_dim].
        """
        self.reshape_and_cache(key, value, key_cache, value_cache, meta.slot_mapping)
        if rows.numel() == 0:
            return query.new_empty((0,) + tuple(query.shape[1:]))
        ends = meta.query_start_loc[1:].to(torch.int64)       # one past each sequence's rows
        seq = torch.searchsorted(ends, rows, right=True)
        # a row's context: its sequence's, less the new tokens after it
        context = meta.context_lens.to(torch.int64)[seq] - (ends[seq] - 1 - rows)
        return self.paged_attention_decode(query[rows], key_cache, value_cache,
                                           meta.block_tables[seq],
                                           context.to(meta.context_lens.dtype), scale)
