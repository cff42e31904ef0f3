"""Split-K decoding (flash-decoding) for the Triton PagedAttention kernel.

With few sequences, one program per (sequence, kv head) leaves most of a GPU idle while
each program walks a long context. Split the context into partitions instead: grid
(sequence, kv head, partition); each partition runs the decode loop over its slice and
writes its own running max, sum and unnormalised output, and a reduce kernel rescales
them to the global max and adds them up (the same step the online softmax takes).

Invariant: merging partitions in any order gives the single-pass result up to the order
of float32 additions; a partition past a sequence's context writes nothing, and the
reduce kernel reads only the partitions that wrote.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .paged_attention_common import (attend_tokens, cache_strides, check_inputs, common_meta,
                                     group_pad, load_query_group, query_rows)

#: tokens per split-K partition when the caller does not choose (vLLM v2 uses 512)
DEFAULT_PARTITION_SIZE = 512


@triton.jit
def _decode_partition_kernel(part_out_ptr, part_max_ptr, part_sum_ptr,
                             query_ptr, key_cache_ptr, value_cache_ptr,
                             block_tables_ptr, context_lens_ptr, qk_scale, num_heads,
                             num_parts, stride_qs, stride_qh, stride_bt,
                             stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                             PARTITION_SIZE: tl.constexpr,
                             HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                             GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
                             UPCAST: tl.constexpr):
    """Program (seq, kv_head, part): the decode loop over one slice of the context.

    Writes, per query head, the slice's running max m, sum l (both log2 domain) and the
    *unnormalised* accumulator; partitions past the context write nothing (the reduce
    kernel knows how many partitions each sequence has).
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    tok_begin = part * PARTITION_SIZE
    if tok_begin >= context_len:
        return
    tok_end = tl.minimum(tok_begin + PARTITION_SIZE, context_len)

    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_DIM
    q, heads, row_mask = load_query_group(query_ptr, seq, kv_head, stride_qs, stride_qh,
                                           offs_d, d_mask, GROUP, GROUP_PAD, UPCAST)
    q_pos = tl.zeros([GROUP_PAD], dtype=tl.int32) + (context_len - 1)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc, m_i, l_i = attend_tokens(q, q_pos, acc, m_i, l_i, key_cache_ptr, value_cache_ptr,
                                   block_tables_ptr + seq.to(tl.int64) * stride_bt, kv_head,
                                   tok_begin, tok_end,
                                   stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                   stride_vh, offs_d, d_mask, qk_scale,
                                   BLOCK_SIZE, TILE_N, UPCAST)
    # Scratch layout: [num_seqs, num_heads, num_parts] for m and l, [..., HEAD_PAD] for acc.
    row = (seq * num_heads + heads) * num_parts + part
    tl.store(part_max_ptr + row, m_i, mask=row_mask)
    tl.store(part_sum_ptr + row, l_i, mask=row_mask)
    tl.store(part_out_ptr + row[:, None] * HEAD_PAD + offs_d[None, :], acc,
             mask=row_mask[:, None])


@triton.jit
def _decode_reduce_kernel(out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
                          context_lens_ptr, num_heads, num_parts_max, stride_os, stride_oh,
                          PARTITION_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                          HEAD_PAD: tl.constexpr, GROUP: tl.constexpr,
                          GROUP_PAD: tl.constexpr):
    """Program (seq, kv_head): merge the partitions' softmax states into the output.

    Merging a partition's (m_p, l_p, acc_p) into the running (m_i, l_i, acc) is the very
    rescaling one step of the online softmax does: bring both to the larger max, add.
    The result is  sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p  with M = max_p m_p.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    num_parts = (context_len + PARTITION_SIZE - 1) // PARTITION_SIZE   # those that wrote

    offs_g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + offs_g
    row_mask = offs_g < GROUP
    offs_d = tl.arange(0, HEAD_PAD)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], dtype=tl.float32)
    for part in range(num_parts):
        row = (seq * num_heads + heads) * num_parts_max + part
        # Padding rows read m_p = 0, l_p = 0: finite, and never stored.
        m_p = tl.load(part_max_ptr + row, mask=row_mask, other=0.0)
        l_p = tl.load(part_sum_ptr + row, mask=row_mask, other=0.0)
        acc_p = tl.load(part_out_ptr + row[:, None] * HEAD_PAD + offs_d[None, :],
                        mask=row_mask[:, None], other=0.0)
        m_new = tl.maximum(m_i, m_p)
        alpha = tl.exp2(m_i - m_new)        # rescales what we have (0 on the first step)
        beta = tl.exp2(m_p - m_new)         # rescales the partition
        l_i = l_i * alpha + l_p * beta
        acc = acc * alpha[:, None] + acc_p * beta[:, None]
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (offs_d < HEAD_DIM)[None, :])


def paged_attention_decode_split_k(query: torch.Tensor, key_cache: torch.Tensor,
                                   value_cache: torch.Tensor, block_tables: torch.Tensor,
                                   context_lens: torch.Tensor, scale: float,
                                   partition_size: int = DEFAULT_PARTITION_SIZE) -> torch.Tensor:
    """`paged_attention_decode` split along the context (flash-decoding).

    Each of ceil(max_context / partition_size) partitions per (sequence, kv head) runs
    the decode loop over its slice; a reduce kernel merges them. partition_size is
    rounded up to a multiple of the token tile.
    """
    num_seqs = query.shape[0] if query.dim() == 3 else -1
    block_tables, context_lens = check_inputs(query, key_cache, value_cache, block_tables,
                                               context_lens, num_seqs)
    if partition_size < 1:
        raise ValueError(f"partition_size must be >= 1, got {partition_size}")
    query = query_rows(query)
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_seqs == 0:
        return out
    meta = common_meta(query, key_cache)
    tile_n = meta["TILE_N"]
    partition_size = triton.cdiv(partition_size, tile_n) * tile_n
    num_heads = query.shape[1]
    max_context = block_tables.shape[1] * key_cache.shape[1]      # no host sync needed
    num_parts = max(1, triton.cdiv(max_context, partition_size))

    head_pad = meta["HEAD_PAD"]
    part_out = torch.empty((num_seqs, num_heads, num_parts, head_pad), dtype=torch.float32,
                           device=query.device)
    part_max = torch.empty((num_seqs, num_heads, num_parts), dtype=torch.float32,
                           device=query.device)
    part_sum = torch.empty_like(part_max)
    grid = (num_seqs, key_cache.shape[2], num_parts)
    _decode_partition_kernel[grid](
        part_out, part_max, part_sum, query, key_cache, value_cache, block_tables,
        context_lens, scale * math.log2(math.e), num_heads, num_parts,
        query.stride(0), query.stride(1),
        block_tables.stride(0), *cache_strides(key_cache, value_cache),
        PARTITION_SIZE=partition_size,
        GROUP_PAD=group_pad(meta["GROUP"]), **meta)
    _decode_reduce_kernel[(num_seqs, key_cache.shape[2])](
        out, part_out, part_max, part_sum, context_lens, num_heads, num_parts,
        out.stride(0), out.stride(1), PARTITION_SIZE=partition_size,
        HEAD_DIM=meta["HEAD_DIM"], HEAD_PAD=head_pad, GROUP=meta["GROUP"],
        GROUP_PAD=group_pad(meta["GROUP"]))
    return out
