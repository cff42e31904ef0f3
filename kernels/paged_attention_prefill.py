"""The Triton PagedAttention kernel for prompts: several new tokens per sequence, causal,
after an optional cached prefix (a prefix-cache hit or an earlier chunk).

Rows are ragged like FlashAttention's varlen API (``query_start_loc`` is its
``cu_seqlens_q``, ``context_lens`` its ``seqused_k``). Grid (sequence, kv head, query
tile); a tile's rows are *(query token, head in group)* pairs, so each K/V tile is loaded
once for the whole GQA group, as in decode. With one new token a tile is a decode tile.

Invariant: new token j of a sequence with q_len new tokens sits at position
context_len - q_len + j and sees exactly the tokens at positions <= its own.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .paged_attention_common import (attend_tokens, cache_strides, check_inputs, common_meta,
                                     query_rows)


@triton.jit
def _prefill_kernel(out_ptr, query_ptr, key_cache_ptr, value_cache_ptr,
                    block_tables_ptr, context_lens_ptr, query_start_loc_ptr, qk_scale,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_M: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, UPCAST: tl.constexpr):
    """Program (seq, kv_head, query tile).

    A query tile's BLOCK_M rows are (query token, head in group) pairs, row r being
    token r // GROUP and head r % GROUP of the tile's TOKENS_PER_TILE tokens (rows past
    TOKENS_PER_TILE * GROUP are padding). So, as in decode, one K/V tile serves the whole
    group, and a decode step is exactly a prefill with one token per sequence.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tile = tl.program_id(2)
    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    if tile * TOKENS_PER_TILE >= q_len:        # this sequence has fewer new tokens
        return
    context_len = tl.load(context_lens_ptr + seq)

    offs_m = tl.arange(0, BLOCK_M)
    j = tile * TOKENS_PER_TILE + offs_m // GROUP          # new-token index in the sequence
    heads = kv_head * GROUP + offs_m % GROUP
    row_mask = (offs_m < TOKENS_PER_TILE * GROUP) & (j < q_len)
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_DIM

    rows = (q_begin + j).to(tl.int64)
    q = tl.load(query_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh
                + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    # The new tokens are the last q_len of the context (their K/V already written).
    # Padding rows get positions >= context_len: they see everything, stay finite, and
    # are never stored.
    q_pos = context_len - q_len + j

    # Causal skipping: no row of this tile sees past its last token.
    last_visible = context_len - q_len + tl.minimum(q_len, (tile + 1) * TOKENS_PER_TILE)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = attend_tokens(q, q_pos, acc, m_i, l_i, key_cache_ptr, value_cache_ptr,
                                   block_tables_ptr + seq.to(tl.int64) * stride_bt, kv_head,
                                   0, last_visible,
                                   stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                   stride_vh, offs_d, d_mask, qk_scale,
                                   BLOCK_SIZE, TILE_N, UPCAST)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def paged_attention_prefill(query: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, block_tables: torch.Tensor,
                            context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                            scale: float, max_query_len: int | None = None) -> torch.Tensor:
    """Ragged causal prefill: sequence i's new tokens (query rows query_start_loc[i]:
    query_start_loc[i+1]) are the last tokens of its context of context_lens[i] tokens.

    A cached prefix (prefix-cache hit, earlier chunk) is the part of the context before
    the first new token. max_query_len sizes the grid; when None it is read from
    query_start_loc (one host sync).
    """
    num_seqs = context_lens.shape[0] if context_lens.dim() == 1 else -1
    block_tables, context_lens = check_inputs(query, key_cache, value_cache, block_tables,
                                               context_lens, num_seqs)
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"query_start_loc must be [num_seqs + 1 = {num_seqs + 1}], got "
                         f"{tuple(query_start_loc.shape)}")
    query_start_loc = query_start_loc.to(torch.int32).contiguous()
    query = query_rows(query)
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_seqs == 0 or query.shape[0] == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len < 1:
        raise ValueError(f"max_query_len must be >= 1, got {max_query_len}")
    meta = common_meta(query, key_cache)
    group = meta["GROUP"]
    # Rows = (token, head) pairs: enough tokens to fill >= 16 rows, at most ~64 rows.
    block_m = max(16, triton.next_power_of_2(group),
                  min(64, triton.next_power_of_2(group * max_query_len)))
    tokens_per_tile = block_m // group
    grid = (num_seqs, key_cache.shape[2], triton.cdiv(max_query_len, tokens_per_tile))
    _prefill_kernel[grid](out, query, key_cache, value_cache, block_tables, context_lens,
                          query_start_loc, scale * math.log2(math.e),
                          query.stride(0), query.stride(1), out.stride(0), out.stride(1),
                          block_tables.stride(0), *cache_strides(key_cache, value_cache),
                          BLOCK_M=block_m, TOKENS_PER_TILE=tokens_per_tile, **meta)
    return out
