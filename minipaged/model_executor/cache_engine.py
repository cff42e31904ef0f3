"""The KV cache tensors and the block operations on them (paper sections 4.2-4.5).

The block manager decides *which* blocks to copy or swap and returns plain pairs; this
module is the only place those decisions touch tensors. There is one pair of caches
per layer, on the device (the paged pool of section 4.2) and on the host (the swap
space of section 4.5), in the layout [num_blocks, block_size, num_kv_heads, head_dim].

Invariant: a block id means the same block in every layer; one `(src, dst)` pair from
the block manager is applied to all layers' key *and* value caches.
"""

from __future__ import annotations

import torch

from minipaged.attention.base import AttentionBackend


def kv_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                       dtype: torch.dtype) -> int:
    """Bytes one block occupies across all layers, keys and values together."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


class CacheEngine:
    """Owns the device and host KV caches of every layer and applies block operations."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 num_gpu_blocks: int, num_cpu_blocks: int, dtype: torch.dtype,
                 device: torch.device | str, backend: AttentionBackend) -> None:
        self.block_size = block_size
        self.num_gpu_blocks = num_gpu_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.backend = backend
        shape = (block_size, num_kv_heads, head_dim)
        # torch.empty, not zeros: an unwritten slot is never read (the kernels mask by
        # context length), and touching gigabytes of memory at start-up costs seconds.
        self.gpu_cache = [(torch.empty((num_gpu_blocks, *shape), dtype=dtype, device=device),
                           torch.empty((num_gpu_blocks, *shape), dtype=dtype, device=device))
                          for _ in range(num_layers)]
        pin = torch.device(device).type == "cuda"
        self.cpu_cache = [(torch.empty((num_cpu_blocks, *shape), dtype=dtype, pin_memory=pin),
                           torch.empty((num_cpu_blocks, *shape), dtype=dtype, pin_memory=pin))
                          for _ in range(num_layers)]
        self.num_swapped_in = 0
        self.num_swapped_out = 0
        self.num_copied = 0

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Device block -> host block, for each (device, host) pair, in every layer."""
        if not pairs:
            return
        for (gk, gv), (ck, cv) in zip(self.gpu_cache, self.cpu_cache):
            self.backend.swap_blocks(gk, ck, pairs)
            self.backend.swap_blocks(gv, cv, pairs)
        self.num_swapped_out += len(pairs)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Host block -> device block, for each (host, device) pair, in every layer."""
        if not pairs:
            return
        for (gk, gv), (ck, cv) in zip(self.gpu_cache, self.cpu_cache):
            self.backend.swap_blocks(ck, gk, pairs)
            self.backend.swap_blocks(cv, gv, pairs)
        self.num_swapped_in += len(pairs)

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: device block src -> device block dst, in every layer."""
        if not pairs:
            return
        for key_cache, value_cache in self.gpu_cache:
            self.backend.copy_blocks(key_cache, value_cache, pairs)
        self.num_copied += len(pairs)
