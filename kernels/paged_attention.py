"""Triton PagedAttention: decode and prefill over a paged KV cache (paper section 4.1).

The paper's Fig. 5 draws one query token attending to its context *block by block*:
the key/value blocks of a sequence sit anywhere in GPU memory, and the kernel finds
block j of the sequence through the block table (Fig. 6). Every kernel is that picture
turned into a loop (`paged_attention_common.attend_tokens`, shared by the decode kernel
here, split-K's in `paged_attention_split_k` and the prompt's in `paged_attention_prefill`):

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

import torch
import triton
import triton.language as tl

from .paged_attention_common import (attend_tokens, cache_strides, check_inputs, common_meta,
                                     group_pad, load_query_group, query_rows)
# the split-K and prefill kernels live in their own modules; their entry points are part
# of this module's API (DESIGN.md section 3), and the dispatcher below calls split-K
# through this module's name, so that a test can watch it
from .paged_attention_prefill import paged_attention_prefill  # noqa: F401 (re-exported)
from .paged_attention_split_k import DEFAULT_PARTITION_SIZE, paged_attention_decode_split_k

#: below this many (sequence, kv head) programs a GPU has idle SMs: split the context
_SPLIT_K_MAX_PROGRAMS = 64


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
    q, heads, row_mask = load_query_group(query_ptr, seq, kv_head, stride_qs, stride_qh,
                                           offs_d, d_mask, GROUP, GROUP_PAD, UPCAST)
    # The new token is the last of the context: it sees every cached token.
    q_pos = tl.zeros([GROUP_PAD], dtype=tl.int32) + (context_len - 1)

    acc = tl.zeros([GROUP_PAD, HEAD_PAD], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc, m_i, l_i = attend_tokens(q, q_pos, acc, m_i, l_i, key_cache_ptr, value_cache_ptr,
                                   block_tables_ptr + seq.to(tl.int64) * stride_bt, kv_head,
                                   0, context_len,
                                   stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
                                   stride_vh, offs_d, d_mask, qk_scale,
                                   BLOCK_SIZE, TILE_N, UPCAST)
    # An empty context (never produced by the engine) gives 0 rather than 0 / 0.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


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
    block_tables, context_lens = check_inputs(query, key_cache, value_cache, block_tables,
                                               context_lens, num_seqs)
    query = query_rows(query)
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if num_seqs == 0:
        return out
    meta = common_meta(query, key_cache)
    grid = (num_seqs, key_cache.shape[2])
    _decode_kernel[grid](out, query, key_cache, value_cache, block_tables, context_lens,
                         scale * math.log2(math.e),
                         query.stride(0), query.stride(1), out.stride(0), out.stride(1),
                         block_tables.stride(0), *cache_strides(key_cache, value_cache),
                         GROUP_PAD=group_pad(meta["GROUP"]), **meta)
    return out
