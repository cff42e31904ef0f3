"""The Triton attention backend: the paper's PagedAttention kernels (section 4.1) on a GPU.

Every operation is a thin call into `minipaged.kernels` (`paged_attention` for decode
and prefill, `cache_ops` for the cache write, copy-on-write and swap); this class only
adapts them to the `AttentionBackend` interface. On a CPU it runs under the Triton
interpreter (TRITON_INTERPRET=1, set before triton is first imported): correct but slow,
which is how the test suite checks it without a GPU.

Invariant: the backend holds no state; the caches and the metadata are the caller's.
"""

from __future__ import annotations

import torch

from minipaged.attention.base import AttentionBackend
from minipaged.kernels import cache_ops, paged_attention


class TritonBackend(AttentionBackend):
    """PagedAttention with Triton kernels (GPU, or the interpreter on CPU tensors)."""

    name = "triton"

    def reshape_and_cache(self, key: torch.Tensor, value: torch.Tensor,
                          key_cache: torch.Tensor, value_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
        cache_ops.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)

    def paged_attention_decode(self, query: torch.Tensor, key_cache: torch.Tensor,
                               value_cache: torch.Tensor, block_tables: torch.Tensor,
                               context_lens: torch.Tensor, scale: float) -> torch.Tensor:
        return paged_attention.paged_attention_decode(query, key_cache, value_cache,
                                                      block_tables, context_lens, scale)

    def paged_attention_prefill(self, query: torch.Tensor, key_cache: torch.Tensor,
                                value_cache: torch.Tensor, block_tables: torch.Tensor,
                                context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                                scale: float, max_query_len: int | None = None) -> torch.Tensor:
        return paged_attention.paged_attention_prefill(query, key_cache, value_cache,
                                                       block_tables, context_lens,
                                                       query_start_loc, scale, max_query_len)

    def copy_blocks(self, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    pairs: list[tuple[int, int]]) -> None:
        cache_ops.copy_blocks(key_cache, value_cache, pairs)

    def swap_blocks(self, src_cache: torch.Tensor, dst_cache: torch.Tensor,
                    pairs: list[tuple[int, int]]) -> None:
        cache_ops.swap_blocks(src_cache, dst_cache, pairs)
