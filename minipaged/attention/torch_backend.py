"""The fast CPU backend: PagedAttention as one block gather plus one fused attention call.

Paper section 4.1 (Fig. 5/6) without a custom kernel. Instead of walking block tables
inside a kernel, every step gathers each sequence's blocks into a padded, contiguous
[num_seqs, max_blocks * B, num_kv_heads, head_dim] workspace with a single
`index_select` over whole blocks (B * H_kv * D contiguous elements each: a memcpy, not
a per-token gather), then hands it to `scaled_dot_product_attention`, which does the
softmax with fp32 accumulation in blocks and handles grouped-query attention.
Decode and prefill are the same call: prefill packs its ragged queries into
[num_seqs, max_query_len] rows and masks causally (bottom-right aligned: the new tokens
are the *last* ones of the context, so a cached prefix comes for free).

Why this formulation (measured single-threaded while writing it, SmolLM2 decode shapes,
batch 64 x context 2048; benchmarks/kernels.py times the whole call): reusing the gather
workspace between calls (and layers) instead of allocating it is ~2x faster, since a
fresh 100 MB buffer is paid for in page faults; gathering whole blocks beats gathering
token slots by ~1.2-1.5x; SDPA beats an explicit matmul + softmax + matmul by ~2x at
large batch x context and is on par at batch 1.

Decode, the step that dominates generation, adds three things (measured at batch 64
with a realistic spread of contexts, 1 thread: 25 ms -> 8 ms per layer):
- length buckets (buckets.py): the batch is sorted by context and cut into a few
  buckets, each padded only to its own longest context (a dynamic program picks the
  cuts, weighing the rows padding wastes against the fixed cost of one more call), so a
  30-token sequence is not padded to the 450 tokens of the longest one;
- the plan (buckets, block ids, invalid rows) depends only on the block tables and the
  context lengths, which every layer of a step shares: it is built once per step;
- grouped-query attention without copies: the `group` query heads that share one KV head
  become the `group` query rows of that head, so SDPA runs on [S, H_kv, group, D]
  queries against un-repeated K/V.

On the CPU with float32 caches, decode and prefill first go to the C kernels
(`minipaged.kernels.cpu_kernel`: kernels/cpu_paged_attention.c and cpu_paged_prefill.c),
which read K/V where they lie in their blocks; the gather + SDPA path below is what runs
everywhere else (and with `c_kernel=False`), and what the tests compare them with.

Invariant: the workspace holds garbage past each sequence's context (padding blocks,
the unused tail of its last block: NaN is allowed there). Masking the scores is not
enough (NaN in K poisons the score before the mask is added; 0 * NaN = NaN in P @ V), so
those rows are zeroed before the attention call; only they, not the whole workspace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from minipaged.attention.base import AttentionBackend
from minipaged.attention.buckets import Bucket, decode_buckets, prefill_buckets
from minipaged.kernels import cpu_kernel

_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


class TorchBackend(AttentionBackend):
    """Paged attention with plain torch ops; runs on any device torch supports."""

    name = "torch"

    def __init__(self, c_kernel: bool | None = None) -> None:
        # Decode through kernels/cpu_paged_attention.c where it applies (float32 on the
        # CPU): None = when it builds here, False = never (the gather + SDPA path below).
        self.c_kernel = c_kernel
        # Reused gather buffers, keyed by (name, dtype, device); they only ever grow.
        self._workspace: dict[tuple, torch.Tensor] = {}
        # The last plan of each kind ("decode", "prefill"): (block_size, the tensors it
        # was built from, buckets). A mixed batch alternates the two kinds every layer.
        self._plans: dict[str, tuple] = {}

    # --- cache writes and block moves -------------------------------------------------

    def reshape_and_cache(self, key: torch.Tensor, value: torch.Tensor,
                          key_cache: torch.Tensor, value_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
        """Write token i's K/V into flat slot `slot_mapping[i]` (-1: skip the token)."""
        if self.c_kernel is not False and cpu_kernel.write_kv(key, value, key_cache,
                                                              value_cache, slot_mapping):
            return
        num_kv_heads, head_dim = key_cache.shape[2:]
        flat_k = key_cache.view(-1, num_kv_heads, head_dim)   # slot = block * B + offset
        flat_v = value_cache.view(-1, num_kv_heads, head_dim)
        slots = slot_mapping.to(device=key_cache.device, dtype=torch.long)
        keep = slots >= 0
        if not bool(keep.all()):
            slots, key, value = slots[keep], key[keep], value[keep]
        flat_k.index_copy_(0, slots, key.to(key_cache.dtype))
        flat_v.index_copy_(0, slots, value.to(value_cache.dtype))

    def copy_blocks(self, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    pairs: list[tuple[int, int]]) -> None:
        """All pairs at once: the sources are read before any destination is written,
        which equals doing them one by one because no destination is also a source."""
        if not pairs:
            return
        src, dst = torch.tensor(pairs, dtype=torch.long, device=key_cache.device).unbind(1)
        key_cache.index_copy_(0, dst, key_cache.index_select(0, src))
        value_cache.index_copy_(0, dst, value_cache.index_select(0, src))

    def swap_blocks(self, src_cache: torch.Tensor, dst_cache: torch.Tensor,
                    pairs: list[tuple[int, int]]) -> None:
        """Copy blocks between pools that may live on different devices (same dtype)."""
        if not pairs:
            return
        src, dst = torch.tensor(pairs, dtype=torch.long).unbind(1)
        blocks = src_cache.index_select(0, src.to(src_cache.device))
        dst_cache.index_copy_(0, dst.to(dst_cache.device), blocks.to(dst_cache.device))

    # --- attention ----------------------------------------------------------------------

    def _buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        key = (name, like.dtype, like.device)
        buf = self._workspace.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._workspace[key] = torch.empty(numel, dtype=like.dtype,
                                                     device=like.device)
        return buf[:numel].view(shape)

    def _cached_plan(self, kind: str, tensors: tuple[torch.Tensor, ...], shape_key: object,
                     build: Callable[[], Any]) -> Any:
        """The step's plan of this kind, built on the first layer's call and reused by the
        others. Keyed by value (a few hundred integers: cheaper than any other key that
        stays correct when a caller refills the same tensors in place), and by
        `shape_key`, what else the plan depends on (the block size; the pool's size)."""
        cached = self._plans.get(kind)
        if (cached is not None and cached[0] == shape_key
                and all(a.shape == b.shape and a.device == b.device and torch.equal(a, b)
                        for a, b in zip(cached[1], tensors))):
            return cached[2]
        plan = build()
        self._plans[kind] = (shape_key, tuple(t.clone() for t in tensors), plan)
        return plan

    def _gather_bucket(self, key_cache: torch.Tensor, value_cache: torch.Tensor,
                       bucket: Bucket) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [num_seqs, width, H_kv, D] of a bucket; rows past a context zeroed."""
        block_size, num_kv_heads, head_dim = key_cache.shape[1:]
        shape = (bucket.num_seqs * bucket.num_blocks, block_size, num_kv_heads, head_dim)
        k = torch.index_select(key_cache, 0, bucket.block_ids,
                               out=self._buffer("k", shape, key_cache))
        v = torch.index_select(value_cache, 0, bucket.block_ids,
                               out=self._buffer("v", shape, value_cache))
        width = bucket.num_blocks * block_size
        k = k.view(bucket.num_seqs * width, num_kv_heads, head_dim)
        v = v.view(bucket.num_seqs * width, num_kv_heads, head_dim)
        if bucket.invalid_rows is not None:
            k.index_fill_(0, bucket.invalid_rows, 0)
            v.index_fill_(0, bucket.invalid_rows, 0)
        shape = (bucket.num_seqs, width, num_kv_heads, head_dim)
        return k.view(shape), v.view(shape)

    def _gather(self, key_cache: torch.Tensor, value_cache: torch.Tensor,
                block_tables: torch.Tensor, context_lens: torch.Tensor, max_context_len: int,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Each sequence's context, padded: K, V [S, L, H_kv, D] and valid [S, L] (bool).

        L = max_blocks * B >= max_context_len. Invalid rows of K and V are zeroed; valid
        is None when there are none (then no mask is needed at all).
        """
        num_seqs = block_tables.shape[0]
        block_size, num_kv_heads, head_dim = key_cache.shape[1:]
        max_blocks = -(-max_context_len // block_size)
        ids = block_tables[:, :max_blocks].reshape(-1).to(key_cache.device, torch.long)
        shape = (num_seqs * max_blocks, block_size, num_kv_heads, head_dim)
        k = torch.index_select(key_cache, 0, ids, out=self._buffer("k", shape, key_cache))
        v = torch.index_select(value_cache, 0, ids, out=self._buffer("v", shape, value_cache))
        width = max_blocks * block_size
        positions = torch.arange(width, device=key_cache.device)
        valid = positions[None, :] < context_lens.to(key_cache.device)[:, None]
        invalid_rows = torch.nonzero(~valid.view(-1)).view(-1)
        k = k.view(num_seqs * width, num_kv_heads, head_dim)
        v = v.view(num_seqs * width, num_kv_heads, head_dim)
        if invalid_rows.numel():
            k.index_fill_(0, invalid_rows, 0)
            v.index_fill_(0, invalid_rows, 0)
        else:
            valid = None
        shape = (num_seqs, width, num_kv_heads, head_dim)
        return k.view(shape), v.view(shape), valid

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                scale: float, causal: bool = False) -> torch.Tensor:
        """q [S, H, Q, D]; k, v [S, L, H_kv, D]; mask [S, 1, Q, L] or None -> [S, H, Q, D].

        causal=True (with mask None) is SDPA's own mask: top-left aligned, row j sees
        keys 0..j.
        """
        k, v = k.transpose(1, 2), v.transpose(1, 2)               # views, no copy
        group = q.shape[1] // k.shape[1]
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                  scale=scale, enable_gqa=group > 1)
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              scale=scale)

    def _use_c_kernel(self, query: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor) -> bool:
        if self.c_kernel is False or not cpu_kernel.supports(query, key_cache, value_cache):
            return False
        available = cpu_kernel.load() is not None
        if self.c_kernel and not available:
            raise RuntimeError("c_kernel=True but the C decode kernel could not be built")
        return available

    def paged_attention_decode(self, query: torch.Tensor, key_cache: torch.Tensor,
                               value_cache: torch.Tensor, block_tables: torch.Tensor,
                               context_lens: torch.Tensor, scale: float) -> torch.Tensor:
        if self._use_c_kernel(query, key_cache, value_cache):
            num_blocks, block_size = key_cache.shape[:2]
            # checked once per step, not once per layer
            plan = self._cached_plan(
                "c_decode", (block_tables, context_lens), (block_size, num_blocks),
                lambda: cpu_kernel.plan_decode(block_tables, context_lens, num_blocks,
                                               block_size))
            return cpu_kernel.paged_attention_decode(query, key_cache, value_cache,
                                                     block_tables, context_lens, scale, plan)
        num_seqs, num_heads, head_dim = query.shape
        block_size, num_kv_heads = key_cache.shape[1:3]
        group = num_heads // num_kv_heads
        q = query.to(key_cache.dtype)
        buckets = self._cached_plan("decode", (block_tables, context_lens), block_size,
                                   lambda: decode_buckets(block_tables, context_lens, block_size))
        out = q.new_empty(q.shape) if len(buckets) > 1 else None
        for b in buckets:
            k, v = self._gather_bucket(key_cache, value_cache, b)
            qb = q if b.rows is None else q.index_select(0, b.rows)
            # Query head h uses KV head h // group (repeat_interleave's order), so the
            # `group` heads of one KV head are consecutive: they become its query rows.
            o = F.scaled_dot_product_attention(
                qb.view(b.num_seqs, num_kv_heads, group, head_dim), k.transpose(1, 2),
                v.transpose(1, 2), attn_mask=b.mask, scale=scale)
            o = o.reshape(b.num_seqs, num_heads, head_dim)
            if out is None:
                return o.to(query.dtype)
            out.index_copy_(0, b.rows, o)
        return out.to(query.dtype)

    def paged_attention_prefill(self, query: torch.Tensor, key_cache: torch.Tensor,
                                value_cache: torch.Tensor, block_tables: torch.Tensor,
                                context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                                scale: float, max_query_len: int | None = None) -> torch.Tensor:
        if self._use_c_kernel(query, key_cache, value_cache):
            num_blocks, block_size = key_cache.shape[:2]
            plan = self._cached_plan(
                "c_prefill", (block_tables, context_lens, query_start_loc),
                (block_size, num_blocks, query.shape[0]),
                lambda: cpu_kernel.plan_prefill(block_tables, context_lens, query_start_loc,
                                                query.shape[0], num_blocks, block_size))
            out = cpu_kernel.paged_attention_prefill(query, key_cache, value_cache,
                                                     block_tables, context_lens,
                                                     query_start_loc, scale, plan)
            if out is not None:       # None: a head layout the C kernel does not cover
                return out
        num_tokens, num_heads, head_dim = query.shape
        block_size = key_cache.shape[1]
        q = query.to(key_cache.dtype)
        out = torch.empty_like(q)
        buckets = self._cached_plan(
            "prefill", (block_tables, context_lens, query_start_loc), block_size,
            lambda: prefill_buckets(block_tables, context_lens, query_start_loc, block_size))
        for b in buckets:
            k, v = self._gather_bucket(key_cache, value_cache, b)
            # Pack the bucket's ragged queries into [n, Q] rows, attend, unpack.
            qb = q.index_select(0, b.pack_index).view(b.num_seqs, b.max_query_len,
                                                      num_heads, head_dim)
            o = self._attend(qb.transpose(1, 2), k, v, b.mask, scale, b.causal)  # [n,H,Q,D]
            o = o.transpose(1, 2).reshape(b.num_seqs * b.max_query_len, num_heads, head_dim)
            out.index_copy_(0, b.token_rows, o.index_select(0, b.packed_rows))
        return out.to(query.dtype)
