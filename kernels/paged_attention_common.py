"""What every Triton PagedAttention kernel shares: the loop of the paper's Fig. 5, the
loading of a GQA group's queries, and the host-side checks and compile-time sizes.

The kernels themselves are in `paged_attention` (decode, and the overview of the design),
`paged_attention_split_k` (flash-decoding) and `paged_attention_prefill`.

Invariant: `attend_tokens` only ever reads cache slots of the tokens it is given, through
the block table; every slot past a sequence's context may hold any bits (NaN included).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------
# The inner loop, shared by every kernel: Fig. 5 of the paper.
# --------------------------------------------------------------------------------------

@triton.jit
def attend_tokens(q, q_pos, acc, m_i, l_i,
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
def load_query_group(query_ptr, seq, kv_head, stride_qs, stride_qh, offs_d, d_mask,
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
# Host side: argument checks and compile-time sizes (DESIGN.md section 3 signatures).
# --------------------------------------------------------------------------------------

def check_inputs(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
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


def common_meta(query: torch.Tensor, key_cache: torch.Tensor) -> dict:
    """Compile-time sizes shared by the kernels: paddings, tile, dtype handling."""
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    # bf16 tl.dot is wrong under the interpreter; fp32 "upcasts" to itself (no-op).
    upcast = key_cache.dtype == torch.float32 or (key_cache.dtype == torch.bfloat16
                                                   and interpreting())
    return dict(
        HEAD_DIM=head_dim,
        HEAD_PAD=max(16, triton.next_power_of_2(head_dim)),
        GROUP=query.shape[1] // num_kv_heads,
        BLOCK_SIZE=block_size,
        TILE_N=max(16, triton.next_power_of_2(block_size)),
        UPCAST=upcast,
    )


def group_pad(group: int) -> int:
    """Rows of a decode tile: the GQA group, padded to a power of two >= 16 for tl.dot."""
    return max(16, triton.next_power_of_2(group))


def cache_strides(key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, ...]:
    return (key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2))


def query_rows(query: torch.Tensor) -> torch.Tensor:
    """The kernels assume head_dim is contiguous (a q/k/v split of rows is fine)."""
    return query if query.stride(-1) == 1 else query.contiguous()
