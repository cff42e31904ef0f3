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

Invariant: the workspace holds garbage past each sequence's context (padding blocks,
the unused tail of its last block: NaN is allowed there). Masking the scores is not
enough (NaN in K poisons the score before the mask is added; 0 * NaN = NaN in P @ V), so
those rows are zeroed before the attention call; only they, not the whole workspace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minipaged.attention.base import AttentionBackend

_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


class TorchBackend(AttentionBackend):
    """Paged attention with plain torch ops; runs on any device torch supports."""

    name = "torch"

    def __init__(self) -> None:
        # Reused gather buffers, keyed by (name, dtype, device); they only ever grow.
        self._workspace: dict[tuple, torch.Tensor] = {}

    # --- cache writes and block moves -------------------------------------------------

    def reshape_and_cache(self, key: torch.Tensor, value: torch.Tensor,
                          key_cache: torch.Tensor, value_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
        """Write token i's K/V into flat slot `slot_mapping[i]` (-1: skip the token)."""
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

    def paged_attention_decode(self, query: torch.Tensor, key_cache: torch.Tensor,
                               value_cache: torch.Tensor, block_tables: torch.Tensor,
                               context_lens: torch.Tensor, scale: float) -> torch.Tensor:
        num_seqs, num_heads, head_dim = query.shape
        k, v, valid = self._gather(key_cache, value_cache, block_tables, context_lens,
                                   int(context_lens.max()))
        q = query.to(key_cache.dtype).view(num_seqs, num_heads, 1, head_dim)
        mask = None if valid is None else valid[:, None, None, :]
        out = self._attend(q, k, v, mask, scale)
        return out.view(num_seqs, num_heads, head_dim).to(query.dtype)

    def paged_attention_prefill(self, query: torch.Tensor, key_cache: torch.Tensor,
                                value_cache: torch.Tensor, block_tables: torch.Tensor,
                                context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                                scale: float, max_query_len: int | None = None) -> torch.Tensor:
        num_tokens, num_heads, head_dim = query.shape
        num_seqs = context_lens.shape[0]
        device = key_cache.device
        starts = query_start_loc.to(device, torch.long)
        query_lens = starts[1:] - starts[:-1]
        if max_query_len is None:
            max_query_len = int(query_lens.max())
        ctx = context_lens.to(device, torch.long)
        k, v, valid = self._gather(key_cache, value_cache, block_tables, context_lens,
                                   int(ctx.max()))
        # Pack the ragged queries: token i of the batch -> row (seq, j) of a padded batch.
        seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device),
                                               query_lens, output_size=num_tokens)
        j = torch.arange(num_tokens, device=device) - starts[seq_of_token]
        q = query.new_zeros((num_seqs, max_query_len, num_heads, head_dim),
                            dtype=key_cache.dtype)
        q[seq_of_token, j] = query.to(key_cache.dtype)
        # Causal, bottom-right aligned: new token j of a sequence sits at position
        # ctx - q_len + j and sees positions 0..that. Padding rows (j >= q_len) see at
        # least position 0, so no row is fully masked (which would give NaN); their
        # outputs are dropped when unpacking.
        mask, causal = None, True
        if not bool((query_lens == ctx).all()):
            # Some sequence has a cached prefix: build the bottom-right aligned mask.
            # (Without one, query j is position j, and SDPA's is_causal is the same mask
            # and ~2.5x faster at 2048 tokens since it skips blocks above the diagonal.)
            q_pos = (ctx - query_lens)[:, None] + torch.arange(max_query_len, device=device)
            positions = torch.arange(k.shape[1], device=device)
            mask = positions[None, None, :] <= q_pos[:, :, None]
            if valid is not None:
                mask &= valid[:, None, :]
            mask, causal = mask[:, None], False
        out = self._attend(q.transpose(1, 2), k, v, mask, scale, causal)   # [S, H, Q, D]
        return out.transpose(1, 2)[seq_of_token, j].to(query.dtype)
