"""Triton PagedAttention: decode and prefill over a paged KV cache (paper section 4.1).

The paper's Fig. 5 draws one query token attending to its context *block by block*:
the key/value blocks of a sequence sit anywhere in GPU memory, and the kernel finds
block j of the sequence through the block table (Fig. 6). Every kernel below is that
picture turned into a loop:

    for each tile of TILE_N context tokens t:             # Fig. 5: block by block
        block = block_table[seq, t // B]                   # Fig. 6: logical -> physical
        K, V  = cache[block, t % B, kv_head, :]            # physical blocks anywhere
        scores = Q @ K^T;   online softmax;   acc += P @ V

Layout (vLLM v1, FlashAttention's and FlashInfer's "NHD"):
``key_cache / value_cache [num_blocks, block_size, num_kv_heads, head_dim]``.

How a batch names its blocks. We use the *padded block table* of vLLM and
FlashAttention (``flash_attn_with_kvcache(..., block_table=, cache_seqlens=)``);
FlashInfer uses the *CSR* form. Side by side, for block size 4 and contexts 6 and 1:

    padded (vLLM, FlashAttention, here)       CSR (FlashInfer)
    block_tables [num_seqs, max_blocks]       kv_indptr        [num_seqs + 1] = [0, 2, 3]
                 = [[7, 2], [5, 0]]           kv_indices       [total_pages]  = [7, 2, 5]
    context_lens [num_seqs] = [6, 1]          kv_last_page_len [num_seqs]     = [2, 1]

The row padding (the 0 after 5) is a real block id, so a kernel must never read past
ceil(context_len / B) blocks. `minipaged.kernels.layouts.block_table_to_csr` converts.

Design choices, and why:

* **Grid (sequence, kv head)**, with the query heads that share that KV head (the GQA
  group) stacked as the M rows of ``tl.dot``. Each K/V tile is then loaded once for the
  whole group: grouped-query attention costs one pass over the KV, not one per head.
* **tl.dot needs every dimension >= 16** on a GPU. M: the group is padded to >= 16 rows
  (masked; decode is memory-bound, so the idle rows cost nothing that matters). K: the
  head dim is padded to a power of two >= 16 (masked, so 80 or 96 work too). N: a tile
  holds TILE_N = max(16, next_pow2(B)) *tokens*, which is several blocks when B < 16:
  every token looks up its own block id (``t // B``), so any block size works, 1 included,
  and each block's id is simply fetched by all the tokens that live in it.
* **Masked loads**, not only masked scores: slots past the context (and whole blocks
  past the table's useful part) may hold NaN, and 0 * NaN = NaN in ``P @ V``.
* **Online softmax in the exp2 domain**: scores are multiplied by scale * log2(e) once,
  so every exponential is a cheap ``exp2``; the running max m, the running sum l and the
  output accumulator are fp32 whatever the cache dtype.
* **bf16** is upcast to fp32 before ``tl.dot`` under the interpreter (it multiplies bf16
  as raw integers); fp16 feeds tl.dot directly with fp32 accumulation; fp32 uses IEEE
  precision (no TF32), so fp32 results are tight.
* **Split-K (flash-decoding)** for few long sequences: grid (sequence, kv head,
  partition); each partition writes its own max, sum and unnormalised output, and a
  reduce kernel rescales them to the global max and adds them up.
* **Prefill** rows are ragged like FlashAttention's varlen API (``query_start_loc`` is
  its ``cu_seqlens_q``, ``context_lens`` its ``seqused_k``). Grid (sequence, kv head,
  query tile); a tile's rows are *(query token, head in group)* pairs, not one token
  tile per head, for the same reason as in decode: each K/V tile is loaded once for the
  whole group. With one new token the tile is exactly a decode tile. Causality is a
  per-row position: new token j of a sequence sits at context_len - q_len + j.

Invariant: a kernel only ever reads cache slots of tokens 0..context_len-1 of its own
sequence; everything else in the cache may hold any bits (NaN included).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

#: tokens per split-K partition when the caller does not choose (vLLM v2 uses 512)
DEFAULT_PARTITION_SIZE = 512
#: below this many (sequence, kv head) programs a GPU has idle SMs: split the context
_SPLIT_K_MAX_PROGRAMS = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------
# The inner loop, shared by every kernel: Fig. 5 of the paper.
# --------------------------------------------------------------------------------------

@triton.jit
def _attend_tokens(q, q_pos, acc, m_i, l_i,
                   key_cache_ptr, value_cache_ptr, block_table_ptr, kv_head,
                   tok_begin, tok_end,
                   stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                   offs_d, d_mask, qk_scale,
                   BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
                   UPCAST: tl.constexpr):
    """Attend rows of q to context tokens tok_begin..tok_end-1, a tile at a time.

    q [M, HEAD_PAD] (already in the dot dtype), q_pos [M] the position of each row's query
    token (causal: a row sees tokens t <= q_pos), acc/m_i/l_i the running state. Returns
    the updated (acc, m_i, l_i). tok_begin must be 0 or a multiple of TILE_N.
    """
    offs_n = tl.arange(0, TILE_N)
    for tile_begin in range(tok_begin, tok_end, TILE_N):
        t = tile_begin + offs_n                                   # token positions [N]
        in_range = t < tok_end
        # Fig. 6: logical block t // B -> physical block, which can be anywhere. Widen to
        # int64 before multiplying by the block stride: num_blocks * block bytes easily
        # exceeds 2**31 on a real GPU.
        block = tl.load(block_table_ptr + t // BLOCK_SIZE, mask=in_range, other=0)
        block = block.to(tl.int64)
        offset = t % BLOCK_SIZE
        kv_mask = in_range[:, None] & d_mask[None, :]
        # Masked loads: slots past the context may hold NaN; 0 * NaN would poison P @ V.
        k = tl.load(key_cache_ptr + block[:, None] * stride_kb + offset[:, None] * stride_kt
                    + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(value_cache_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vt
                    + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        # Scores in the log2 domain: qk_scale = scale * log2(e), so exp(x) = exp2(x').
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale        # [M, N]
        visible = in_range[None, :] & (t[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))

        # Online softmax (FlashAttention): rescale what we have to the new running max.
        # The first tile visited holds a token every row sees (token 0 in a prefill; any
        # context token in a decode or a split-K slice), so m_new is finite from the
        # first step on and exp2(m_i - m_new) never meets (-inf) - (-inf).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _load_query_group(query_ptr, seq, kv_head, stride_qs, stride_qh, offs_d, d_mask,
                      GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, UPCAST: tl.constexpr):
    """The GROUP query heads of one token that read kv_head, as GROUP_PAD rows (rest 0)."""
    offs_g = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + offs_g
    row_mask = offs_g < GROUP
    q = tl.load(query_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q, heads, row_mask


# --------------------------------------------------------------------------------------
# Decode: one new token per sequence.
# --------------------------------------------------------------------------------------

@triton.jit
def _decode_kernel(out_ptr, query_ptr, key_cache_ptr, value_cache_ptr,
                   block_tables_ptr, context_lens_ptr, qk_scale,
                   stride_qs, stride_qh, stride_os, stride_oh, stride_bt,
                   stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                   HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, UPCAST: tl.constexpr):
    """Program (seq, kv_head): the whole group of query heads over the whole context."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)

    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_DIM
    q, heads, row_mask = _load_query_group(query_ptr, seq, kv_head, stride_qs, stride_qh,
                                           offs_d, d_mask, GROUP, GROUP_PAD, UPCAST)
    # The new token is the last of the context: it sees every cached token.
    q_pos = tl.zeros([GROUP_PAD], dtype=tl.int32) + (context_len - 1)

    acc = tl.zeros([GROUP_PAD, HEAD_PAD], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc, m_i, l_i = _attend_tokens(q, q_pos, acc, m_i, l_i, key_cache_ptr, value_cache_ptr,
                                   block_tables_ptr + seq.to(tl.int64) * stride_bt, kv_head,
                                   0, context_len,
                                   stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                   stride_vh, offs_d, d_mask, qk_scale,
                                   BLOCK_SIZE, TILE_N, UPCAST)
    # An empty context (never produced by the engine) gives 0 rather than 0 / 0.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


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
    q, heads, row_mask = _load_query_group(query_ptr, seq, kv_head, stride_qs, stride_qh,
                                           offs_d, d_mask, GROUP, GROUP_PAD, UPCAST)
    q_pos = tl.zeros([GROUP_PAD], dtype=tl.int32) + (context_len - 1)
    acc = tl.zeros([GROUP_PAD, HEAD_PAD], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc, m_i, l_i = _attend_tokens(q, q_pos, acc, m_i, l_i, key_cache_ptr, value_cache_ptr,
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


# --------------------------------------------------------------------------------------
# Prefill: several new tokens per sequence, causal, after an optional cached prefix.
# --------------------------------------------------------------------------------------

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
    acc, m_i, l_i = _attend_tokens(q, q_pos, acc, m_i, l_i, key_cache_ptr, value_cache_ptr,
                                   block_tables_ptr + seq.to(tl.int64) * stride_bt, kv_head,
                                   0, last_visible,
                                   stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                   stride_vh, offs_d, d_mask, qk_scale,
                                   BLOCK_SIZE, TILE_N, UPCAST)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


# --------------------------------------------------------------------------------------
# Python wrappers (DESIGN.md section 3 signatures).
# --------------------------------------------------------------------------------------

def _check_inputs(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_tables: torch.Tensor, context_lens: torch.Tensor,
                  num_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes (ValueError naming the argument); return int32 tables and lengths."""
    if query.dim() != 3:
        raise ValueError("query must be 3-D [tokens, num_heads, head_dim], got "
                         f"{tuple(query.shape)}")
    if key_cache.dim() != 4:
        raise ValueError("key_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {tuple(key_cache.shape)}")
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache shape {tuple(value_cache.shape)} differs from "
                         f"key_cache shape {tuple(key_cache.shape)}")
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_dim:
        raise ValueError(f"key_cache head_dim {key_cache.shape[3]} != query head_dim {head_dim}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"query num_heads {num_heads} is not a multiple of num_kv_heads "
                         f"{num_kv_heads} (key_cache.shape[2])")
    if query.dtype != key_cache.dtype or value_cache.dtype != key_cache.dtype:
        raise ValueError(f"query, key_cache and value_cache must share a dtype, got "
                         f"{query.dtype}, {key_cache.dtype}, {value_cache.dtype}")
    if key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("key_cache and value_cache must be contiguous in head_dim")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [num_seqs={num_seqs}, max_blocks], "
                         f"got {tuple(block_tables.shape)}")
    if context_lens.shape != (num_seqs,):
        raise ValueError(f"context_lens must be [num_seqs={num_seqs}], got "
                         f"{tuple(context_lens.shape)}")
    return (block_tables.to(torch.int32).contiguous(), context_lens.to(torch.int32).contiguous())


def _common_meta(query: torch.Tensor, key_cache: torch.Tensor) -> dict:
    """Compile-time sizes shared by the kernels: paddings, tile, dtype handling."""
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    # bf16 tl.dot is wrong under the interpreter; fp32 "upcasts" to itself (no-op).
    upcast = key_cache.dtype == torch.float32 or (key_cache.dtype == torch.bfloat16
                                                   and _interpreting())
    return dict(
        HEAD_DIM=head_dim,
        HEAD_PAD=max(16, triton.next_power_of_2(head_dim)),
        GROUP=query.shape[1] // num_kv_heads,
        BLOCK_SIZE=block_size,
        TILE_N=max(16, triton.next_power_of_2(block_size)),
        UPCAST=upcast,
    )


def _group_pad(group: int) -> int:
    """Rows of a decode tile: the GQA group, padded to a power of two >= 16 for tl.dot."""
    return max(16, triton.next_power_of_2(group))


def _cache_strides(key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, ...]:
    return (key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2))


def _query_rows(query: torch.Tensor) -> torch.Tensor:
    """The kernels assume head_dim is contiguous (a q/k/v split of rows is fine)."""
    return query if query.stride(-1) == 1 else query.contiguous()


def use_split_k(num_seqs: int, num_kv_heads: int, max_context_len: int,
                partition_size: int = DEFAULT_PARTITION_SIZE) -> bool:
    """Heuristic: split the context when (seq, kv head) programs are too few to fill a
    GPU and the longest possible context spans several partitions."""
    return (num_seqs * num_kv_heads < _SPLIT_K_MAX_PROGRAMS
            and max_context_len > 2 * partition_size)


def paged_attention_decode(query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One new token per sequence attends to its whole paged context.

    query [num_seqs, num_heads, head_dim]; caches [num_blocks, B, num_kv_heads, head_dim];
    block_tables [num_seqs, max_blocks] int32; context_lens [num_seqs] int32 (counting the
    new token). Returns [num_seqs, num_heads, head_dim] in query's dtype. Picks the
    single-pass or the split-K kernel by `use_split_k` (no host sync: the table's width
    bounds the context length).
    """
    max_context = block_tables.shape[1] * key_cache.shape[1] if block_tables.dim() == 2 else 0
    if key_cache.dim() == 4 and use_split_k(query.shape[0], key_cache.shape[2], max_context):
        return paged_attention_decode_split_k(query, key_cache, value_cache, block_tables,
                                              context_lens, scale)
    return paged_attention_decode_single_pass(query, key_cache, value_cache, block_tables,
                                              context_lens, scale)


def paged_attention_decode_single_pass(query: torch.Tensor, key_cache: torch.Tensor,
                                       value_cache: torch.Tensor, block_tables: torch.Tensor,
                                       context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """`paged_attention_decode` with one program per (sequence, kv head)."""
    num_seqs = query.shape[0] if query.dim() == 3 else -1
    block_tables, context_lens = _check_inputs(query, key_cache, value_cache, block_tables,
                                               context_lens, num_seqs)
    query = _query_rows(query)
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_seqs == 0:
        return out
    meta = _common_meta(query, key_cache)
    grid = (num_seqs, key_cache.shape[2])
    _decode_kernel[grid](out, query, key_cache, value_cache, block_tables, context_lens,
                         scale * math.log2(math.e),
                         query.stride(0), query.stride(1), out.stride(0), out.stride(1),
                         block_tables.stride(0), *_cache_strides(key_cache, value_cache),
                         GROUP_PAD=_group_pad(meta["GROUP"]), **meta)
    return out


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
    block_tables, context_lens = _check_inputs(query, key_cache, value_cache, block_tables,
                                               context_lens, num_seqs)
    if partition_size < 1:
        raise ValueError(f"partition_size must be >= 1, got {partition_size}")
    query = _query_rows(query)
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_seqs == 0:
        return out
    meta = _common_meta(query, key_cache)
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
        block_tables.stride(0), *_cache_strides(key_cache, value_cache),
        PARTITION_SIZE=partition_size,
        GROUP_PAD=_group_pad(meta["GROUP"]), **meta)
    _decode_reduce_kernel[(num_seqs, key_cache.shape[2])](
        out, part_out, part_max, part_sum, context_lens, num_heads, num_parts,
        out.stride(0), out.stride(1), PARTITION_SIZE=partition_size,
        HEAD_DIM=meta["HEAD_DIM"], HEAD_PAD=head_pad, GROUP=meta["GROUP"],
        GROUP_PAD=_group_pad(meta["GROUP"]))
    return out


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
    block_tables, context_lens = _check_inputs(query, key_cache, value_cache, block_tables,
                                               context_lens, num_seqs)
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"query_start_loc must be [num_seqs + 1 = {num_seqs + 1}], got "
                         f"{tuple(query_start_loc.shape)}")
    query_start_loc = query_start_loc.to(torch.int32).contiguous()
    query = _query_rows(query)
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_seqs == 0 or query.shape[0] == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len < 1:
        raise ValueError(f"max_query_len must be >= 1, got {max_query_len}")
    meta = _common_meta(query, key_cache)
    group = meta["GROUP"]
    # Rows = (token, head) pairs: enough tokens to fill >= 16 rows, at most ~64 rows.
    block_m = max(16, triton.next_power_of_2(group),
                  min(64, triton.next_power_of_2(group * max_query_len)))
    tokens_per_tile = block_m // group
    grid = (num_seqs, key_cache.shape[2], triton.cdiv(max_query_len, tokens_per_tile))
    _prefill_kernel[grid](out, query, key_cache, value_cache, block_tables, context_lens,
                          query_start_loc, scale * math.log2(math.e),
                          query.stride(0), query.stride(1), out.stride(0), out.stride(1),
                          block_tables.stride(0), *_cache_strides(key_cache, value_cache),
                          BLOCK_M=block_m, TOKENS_PER_TILE=tokens_per_tile, **meta)
    return out
