"""Triton cache operations: write new K/V into slots, copy-on-write, swap (paper 4.1, 4.4, 4.5).

* `reshape_and_cache` is the write half of Fig. 5: each new token's key and value go to
  slot ``block * B + offset`` of the paged caches, the slot chosen by the block manager
  (``slot_mapping``). Several tokens per program; a slot of -1 (padding) is skipped.
* `copy_blocks` is copy-on-write (section 4.4): when a sequence is about to write into a
  block it shares (refcount > 1), the block manager gives it a fresh block and asks for
  ``(src, dst)`` copies, in both the key and the value cache.
* `swap_blocks` is swapping (section 4.5): whole blocks move between the device pool and
  the host pool. Between two devices it is an indexed torch copy (Triton cannot address
  host memory); on one device it is the same block-copy kernel as `copy_blocks`.

Layout: caches are [num_blocks, block_size, num_kv_heads, head_dim]; key/value are
[num_tokens, num_kv_heads, head_dim].

Invariant: these operations write exactly the listed slots / blocks and nothing else,
bit for bit. Pairs with a repeated destination, or a destination that is also a source,
have no defined order (the block manager never produces them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import triton
import triton.language as tl

#: tokens written by one reshape_and_cache program
TOKENS_PER_PROGRAM = 16
#: elements one block-copy program moves (a block is split into chunks of this size)
COPY_CHUNK = 1024


@triton.jit
def _reshape_and_cache_kernel(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr,
                              slot_mapping_ptr, num_tokens,
                              stride_kt, stride_kh, stride_vt, stride_vh,
                              stride_kcb, stride_kct, stride_kch,
                              stride_vcb, stride_vct, stride_vch,
                              NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                              ROW_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                              TOKENS: tl.constexpr):
    """Program i: tokens i*TOKENS .. i*TOKENS+TOKENS-1, each a row of num_kv_heads*head_dim."""
    tok = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)              # [TOKENS]
    tok_mask = tok < num_tokens
    slot = tl.load(slot_mapping_ptr + tok, mask=tok_mask, other=-1).to(tl.int64)
    write = tok_mask & (slot >= 0)                       # -1 = padding token: skip it
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    # One token's K is num_kv_heads * head_dim numbers; column c is (head c // D, dim c % D).
    col = tl.arange(0, ROW_PAD)
    head = col // HEAD_DIM
    dim = col % HEAD_DIM
    mask = write[:, None] & (col < NUM_KV_HEADS * HEAD_DIM)[None, :]
    tok64 = tok.to(tl.int64)

    k = tl.load(key_ptr + tok64[:, None] * stride_kt + head[None, :] * stride_kh + dim[None, :],
                mask=mask)
    v = tl.load(value_ptr + tok64[:, None] * stride_vt + head[None, :] * stride_vh + dim[None, :],
                mask=mask)
    tl.store(key_cache_ptr + block[:, None] * stride_kcb + offset[:, None] * stride_kct
             + head[None, :] * stride_kch + dim[None, :],
             k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + block[:, None] * stride_vcb + offset[:, None] * stride_vct
             + head[None, :] * stride_vch + dim[None, :],
             v.to(value_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _copy_block_kernel(src_ptr, dst_ptr, pairs_ptr,
                       stride_sb, stride_st, stride_sh, stride_db, stride_dt, stride_dh,
                       NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_NUMEL: tl.constexpr, CHUNK: tl.constexpr):
    """Program (pair, chunk): copy elements chunk*CHUNK.. of block src to block dst."""
    pair = tl.program_id(0)
    src_block = tl.load(pairs_ptr + 2 * pair).to(tl.int64)
    dst_block = tl.load(pairs_ptr + 2 * pair + 1).to(tl.int64)

    # Element e of a block is (slot e // (H*D), head (e // D) % H, dim e % D): going
    # through the strides keeps non-contiguous caches (e.g. views) correct.
    e = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    mask = e < BLOCK_NUMEL
    slot = e // (NUM_KV_HEADS * HEAD_DIM)
    head = (e // HEAD_DIM) % NUM_KV_HEADS
    dim = e % HEAD_DIM
    x = tl.load(src_ptr + src_block * stride_sb + slot * stride_st + head * stride_sh + dim,
                mask=mask)
    tl.store(dst_ptr + dst_block * stride_db + slot * stride_dt + head * stride_dh + dim,
             x, mask=mask)


def _check_cache(name: str, cache: torch.Tensor) -> None:
    if cache.dim() != 4:
        raise ValueError(f"{name} must be [num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {tuple(cache.shape)}")
    if cache.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in head_dim")


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into slots of the paged caches.

    Token i goes to slot ``slot_mapping[i]`` = block * block_size + offset; -1 skips it.
    Values are cast to the cache dtype. In place; returns nothing.
    """
    _check_cache("key_cache", key_cache)
    _check_cache("value_cache", value_cache)
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache shape {tuple(value_cache.shape)} differs from "
                         f"key_cache shape {tuple(key_cache.shape)}")
    _, block_size, num_kv_heads, head_dim = key_cache.shape
    expected = (key.shape[0], num_kv_heads, head_dim)
    if key.shape != expected:
        raise ValueError(f"key must be [num_tokens, {num_kv_heads}, {head_dim}], got "
                         f"{tuple(key.shape)}")
    if value.shape != expected:
        raise ValueError(f"value must be [num_tokens, {num_kv_heads}, {head_dim}], got "
                         f"{tuple(value.shape)}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must be [num_tokens={key.shape[0]}], got "
                         f"{tuple(slot_mapping.shape)}")
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    slot_mapping = slot_mapping.to(torch.int64).contiguous()
    grid = (triton.cdiv(num_tokens, TOKENS_PER_PROGRAM),)
    _reshape_and_cache_kernel[grid](
        key, value, key_cache, value_cache, slot_mapping, num_tokens,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        ROW_PAD=triton.next_power_of_2(num_kv_heads * head_dim), BLOCK_SIZE=block_size,
        TOKENS=TOKENS_PER_PROGRAM)


def _pairs_tensor(pairs: Sequence[tuple[int, int]] | torch.Tensor, num_src: int,
                  num_dst: int, device: torch.device) -> torch.Tensor:
    """(src, dst) pairs -> int64 [n, 2] on `device`, every id checked against its pool."""
    if isinstance(pairs, torch.Tensor):
        table = pairs.to(device=device, dtype=torch.int64)
    else:
        table = torch.tensor(list(pairs), dtype=torch.int64, device=device)
    if table.numel() == 0:
        return table.reshape(0, 2)
    if table.dim() != 2 or table.shape[1] != 2:
        raise ValueError(f"pairs must be (src, dst) pairs, shape [n, 2]; got {tuple(table.shape)}")
    src, dst = table[:, 0], table[:, 1]
    if bool((src < 0).any()) or bool((src >= num_src).any()):
        raise ValueError(f"pairs: a source block is outside 0..{num_src - 1}")
    if bool((dst < 0).any()) or bool((dst >= num_dst).any()):
        raise ValueError(f"pairs: a destination block is outside 0..{num_dst - 1}")
    return table.contiguous()


def _launch_block_copy(src_cache: torch.Tensor, dst_cache: torch.Tensor,
                       table: torch.Tensor) -> None:
    _, block_size, num_kv_heads, head_dim = src_cache.shape
    block_numel = block_size * num_kv_heads * head_dim
    chunk = min(COPY_CHUNK, triton.next_power_of_2(block_numel))
    grid = (table.shape[0], triton.cdiv(block_numel, chunk))
    _copy_block_kernel[grid](src_cache, dst_cache, table,
                             src_cache.stride(0), src_cache.stride(1), src_cache.stride(2),
                             dst_cache.stride(0), dst_cache.stride(1), dst_cache.stride(2),
                             NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
                             BLOCK_NUMEL=block_numel, CHUNK=chunk)


def copy_blocks(key_cache: torch.Tensor, value_cache: torch.Tensor,
                pairs: Iterable[tuple[int, int]] | torch.Tensor) -> None:
    """Copy-on-write: for each (src, dst), copy block src onto block dst in both caches.

    pairs: a list of (src, dst) or an int tensor [n, 2]. One launch per cache moves all
    the pairs at once (grid: pair x chunk of the block).
    """
    _check_cache("key_cache", key_cache)
    _check_cache("value_cache", value_cache)
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache shape {tuple(value_cache.shape)} differs from "
                         f"key_cache shape {tuple(key_cache.shape)}")
    num_blocks = key_cache.shape[0]
    table = _pairs_tensor(pairs if isinstance(pairs, torch.Tensor) else list(pairs),
                          num_blocks, num_blocks, key_cache.device)
    if table.shape[0] == 0:
        return
    _launch_block_copy(key_cache, key_cache, table)
    _launch_block_copy(value_cache, value_cache, table)


def swap_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor,
                pairs: Iterable[tuple[int, int]] | torch.Tensor,
                use_kernel: bool | None = None) -> None:
    """Swap in / out: block src of src_cache is copied to block dst of dst_cache.

    One call for both directions. When the two caches live on different devices (GPU
    <-> host) the copy is torch indexing: gather the blocks, move them in one transfer,
    scatter them. On one device it is the Triton block-copy kernel. use_kernel=None
    chooses by device; True / False force a path (tests exercise both on the CPU).
    """
    _check_cache("src_cache", src_cache)
    _check_cache("dst_cache", dst_cache)
    if src_cache.shape[1:] != dst_cache.shape[1:] or src_cache.dtype != dst_cache.dtype:
        raise ValueError(f"src_cache {tuple(src_cache.shape[1:])} {src_cache.dtype} and "
                         f"dst_cache {tuple(dst_cache.shape[1:])} {dst_cache.dtype} must have "
                         "the same block shape and dtype")
    same_device = src_cache.device == dst_cache.device
    if use_kernel is None:
        use_kernel = same_device
    if use_kernel and not same_device:
        raise ValueError("use_kernel=True needs src_cache and dst_cache on the same device")
    pairs = pairs if isinstance(pairs, torch.Tensor) else list(pairs)
    if use_kernel:
        table = _pairs_tensor(pairs, src_cache.shape[0], dst_cache.shape[0], src_cache.device)
        if table.shape[0]:
            _launch_block_copy(src_cache, dst_cache, table)
        return
    table = _pairs_tensor(pairs, src_cache.shape[0], dst_cache.shape[0], torch.device("cpu"))
    if table.shape[0] == 0:
        return
    src_ids = table[:, 0].to(src_cache.device)
    dst_ids = table[:, 1].to(dst_cache.device)
    dst_cache[dst_ids] = src_cache[src_ids].to(dst_cache.device)
