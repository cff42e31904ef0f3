"""Pure-NumPy executable definitions of the PagedAttention kernels (paper section 4.1).

Read these first: every other backend (torch, Triton) is tested against them. They are
written for reading, not speed: the decode reference walks the context one token at a
time and fetches each key and value through the block table, exactly as Fig. 5 draws it:

    physical_block = block_table[t // B];  offset = t % B
    k_t = key_cache[physical_block, offset]           # [num_kv_heads, head_dim]

Layout: key_cache / value_cache are [num_blocks, block_size, num_kv_heads, head_dim].
Grouped-query attention: query head h reads KV head h // (num_heads // num_kv_heads).

Invariant: only slots 0..context_len-1 of a sequence are ever read. Unused slots may
hold anything (NaN included) without changing any output.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def slot_of(block_table: np.ndarray, t: int, block_size: int) -> int:
    """The cache slot of token t of a sequence: table[t // B] * B + t % B."""
    return int(block_table[t // block_size]) * block_size + t % block_size


def reshape_and_cache(key: np.ndarray, value: np.ndarray, key_cache: np.ndarray,
                      value_cache: np.ndarray, slot_mapping: np.ndarray) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into the paged caches.

    Token i goes to slot `slot_mapping[i]` = block * block_size + offset; a slot of -1
    means "skip this token" (padding). Writes in place; returns nothing.
    """
    block_size = key_cache.shape[1]
    for i, slot in enumerate(np.asarray(slot_mapping).tolist()):
        if slot < 0:
            continue
        block, offset = divmod(int(slot), block_size)
        key_cache[block, offset] = key[i]
        value_cache[block, offset] = value[i]


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    e = np.exp(x)
    return e / e.sum()


def _attend_one(q: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray,
                block_table: np.ndarray, num_tokens: int, kv_head: int,
                scale: float) -> np.ndarray:
    """One query vector over the first num_tokens tokens of one sequence, token by token."""
    block_size = key_cache.shape[1]
    scores = np.empty(num_tokens, dtype=np.float64)
    values = np.empty((num_tokens, q.shape[-1]), dtype=np.float64)
    for t in range(num_tokens):
        block = int(block_table[t // block_size])      # logical -> physical
        offset = t % block_size
        k = key_cache[block, offset, kv_head].astype(np.float64)
        scores[t] = scale * float(q.astype(np.float64) @ k)
        values[t] = value_cache[block, offset, kv_head]
    return _softmax(scores) @ values


def paged_attention_decode(query: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray,
                           block_tables: np.ndarray, context_lens: np.ndarray,
                           scale: float) -> np.ndarray:
    """One new token per sequence attends to its whole context (decode phase).

    query: [num_seqs, num_heads, head_dim]; block_tables: [num_seqs, max_blocks];
    context_lens: [num_seqs] (the new token's own K/V is already in the cache, so it is
    counted). Returns [num_seqs, num_heads, head_dim] in query's dtype, computed in fp64.
    """
    num_seqs, num_heads, _ = query.shape
    group = num_heads // key_cache.shape[2]
    out = np.zeros(query.shape, dtype=np.float64)
    for s in range(num_seqs):
        for h in range(num_heads):
            out[s, h] = _attend_one(query[s, h], key_cache, value_cache, block_tables[s],
                                    int(context_lens[s]), h // group, scale)
    return out.astype(query.dtype)


def paged_attention_prefill(query: np.ndarray, key_cache: np.ndarray, value_cache: np.ndarray,
                            block_tables: np.ndarray, context_lens: np.ndarray,
                            query_start_loc: np.ndarray, scale: float) -> np.ndarray:
    """Several new tokens per sequence attend causally to the cached context and each other.

    query: [num_tokens, num_heads, head_dim], sequence i owning rows
    query_start_loc[i]:query_start_loc[i+1]. Those rows are the *last* tokens of a
    context of context_lens[i] tokens (their K/V already written), so new token j of a
    sequence with q new tokens sits at position context_len - q + j and sees positions
    0..context_len - q + j. A cached prefix (prefix-cache hit, earlier chunk) is simply
    the part of the context before the first new token.
    """
    num_heads = query.shape[1]
    group = num_heads // key_cache.shape[2]
    out = np.zeros(query.shape, dtype=np.float64)
    starts = np.asarray(query_start_loc)
    for s in range(len(context_lens)):
        start, end = int(starts[s]), int(starts[s + 1])
        first_pos = int(context_lens[s]) - (end - start)
        for j in range(end - start):
            visible = first_pos + j + 1               # causal: itself and everything before
            for h in range(num_heads):
                out[start + j, h] = _attend_one(query[start + j, h], key_cache, value_cache,
                                                block_tables[s], visible, h // group, scale)
    return out.astype(query.dtype)


def copy_blocks(key_cache: np.ndarray, value_cache: np.ndarray,
                pairs: Iterable[tuple[int, int]]) -> None:
    """Copy-on-write (section 4.4): block src is copied onto block dst, in both caches."""
    for src, dst in pairs:
        key_cache[dst] = key_cache[src]
        value_cache[dst] = value_cache[src]


def swap_blocks(src_cache: np.ndarray, dst_cache: np.ndarray,
                pairs: Iterable[tuple[int, int]]) -> None:
    """Swapping (section 4.5): block src of one pool (device/host) goes to block dst of the other."""
    for src, dst in pairs:
        dst_cache[dst] = src_cache[src]


# --------------------------------------------------------------------------------------
# Vectorised versions: the same definitions, gathered in one go. Faster, same numbers.
# --------------------------------------------------------------------------------------

def gather_context(cache: np.ndarray, block_table: np.ndarray, num_tokens: int) -> np.ndarray:
    """[num_tokens, num_kv_heads, head_dim]: one sequence's K or V laid out contiguously."""
    block_size = cache.shape[1]
    t = np.arange(num_tokens)
    return cache[np.asarray(block_table)[t // block_size], t % block_size]


def paged_attention_prefill_vectorized(query: np.ndarray, key_cache: np.ndarray,
                                       value_cache: np.ndarray, block_tables: np.ndarray,
                                       context_lens: np.ndarray, query_start_loc: np.ndarray,
                                       scale: float) -> np.ndarray:
    """`paged_attention_prefill` with one gather and one masked softmax per sequence."""
    num_heads = query.shape[1]
    group = num_heads // key_cache.shape[2]
    out = np.zeros(query.shape, dtype=np.float64)
    starts = np.asarray(query_start_loc)
    for s in range(len(context_lens)):
        start, end = int(starts[s]), int(starts[s + 1])
        n_ctx, n_q = int(context_lens[s]), end - start
        k = np.repeat(gather_context(key_cache, block_tables[s], n_ctx), group, axis=1)
        v = np.repeat(gather_context(value_cache, block_tables[s], n_ctx), group, axis=1)
        q = query[start:end].astype(np.float64)                      # [n_q, H, D]
        scores = scale * np.einsum("qhd,khd->hqk", q, k.astype(np.float64))
        q_pos = n_ctx - n_q + np.arange(n_q)
        future = np.arange(n_ctx)[None, :] > q_pos[:, None]          # [n_q, n_ctx]
        scores = np.where(future[None], -np.inf, scores)
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out[start:end] = np.einsum("hqk,khd->qhd", p, v.astype(np.float64))
    return out.astype(query.dtype)


def paged_attention_decode_vectorized(query: np.ndarray, key_cache: np.ndarray,
                                      value_cache: np.ndarray, block_tables: np.ndarray,
                                      context_lens: np.ndarray, scale: float) -> np.ndarray:
    """`paged_attention_decode` as a prefill of one new token per sequence."""
    query_start_loc = np.arange(query.shape[0] + 1)
    return paged_attention_prefill_vectorized(query, key_cache, value_cache, block_tables,
                                              context_lens, query_start_loc, scale)


def unpack_4bit(packed: np.ndarray, out_features: int, in_features: int) -> np.ndarray:
    """The float32 weight [N, K] that a packed 4-bit form (kernels/cpu_4bit_linear.c's
    layout) stands for: fl(fl(d * q) + m), per row and block of 32 inputs."""
    panels, blocks = out_features // 32, in_features // 32
    raw = np.ascontiguousarray(packed, dtype=np.uint8).reshape(panels, blocks, 768)
    d = raw[..., :128].copy().view(np.float32)                 # [P, B, 32 rows]
    m = raw[..., 128:256].copy().view(np.float32)
    codes = raw[..., 256:].reshape(panels, blocks, 32, 16)     # [P, B, 32 inputs, 16]
    q = np.concatenate([codes & 15, codes >> 4], axis=-1).astype(np.float32)  # [.., rows]
    w = d[:, :, None, :] * q + m[:, :, None, :]                # [P, B, inputs, rows]
    return w.transpose(0, 3, 1, 2).reshape(out_features, in_features).astype(np.float32)
