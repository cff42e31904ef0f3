"""The reference backend: torch tensors in, `kernels/reference.py` (NumPy) underneath.

Paper section 4.1 as executable definitions, wired behind the same interface as the
fast backends, so that a whole model can run on the reference to check the others.
It walks the context token by token in fp64; it is slow on purpose.

Invariant: every op has exactly the reference's semantics; in-place ops (cache write,
block copy, swap) leave the caller's tensors changed as the reference would, whatever
their dtype (bfloat16 has no NumPy type: it travels as float32) or device.
"""

from __future__ import annotations

import numpy as np
import torch

from minipaged.attention.base import AttentionBackend
from minipaged.kernels import reference


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of t when possible (CPU, NumPy dtype), else a float32/host copy."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()


def _write_back(dst: torch.Tensor, arr: np.ndarray) -> None:
    """Make dst hold arr's values, unless arr already *is* dst's memory."""
    if dst.device.type == "cpu" and dst.dtype != torch.bfloat16:
        if np.shares_memory(arr, dst.numpy()):
            return
    dst.copy_(torch.from_numpy(arr))


def _to_torch(arr: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device=like.device, dtype=like.dtype)


class NumpyBackend(AttentionBackend):
    """Runs the literal NumPy reference; for tests and for reading, not for speed."""

    name = "numpy"

    def reshape_and_cache(self, key: torch.Tensor, value: torch.Tensor,
                          key_cache: torch.Tensor, value_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
        kc, vc = _to_numpy(key_cache), _to_numpy(value_cache)
        reference.reshape_and_cache(_to_numpy(key.to(key_cache.dtype)),
                                    _to_numpy(value.to(value_cache.dtype)), kc, vc,
                                    _to_numpy(slot_mapping))
        _write_back(key_cache, kc)
        _write_back(value_cache, vc)

    def paged_attention_decode(self, query: torch.Tensor, key_cache: torch.Tensor,
                               value_cache: torch.Tensor, block_tables: torch.Tensor,
                               context_lens: torch.Tensor, scale: float) -> torch.Tensor:
        out = reference.paged_attention_decode(
            _to_numpy(query), _to_numpy(key_cache), _to_numpy(value_cache),
            _to_numpy(block_tables), _to_numpy(context_lens), scale)
        return _to_torch(out, query)

    def paged_attention_prefill(self, query: torch.Tensor, key_cache: torch.Tensor,
                                value_cache: torch.Tensor, block_tables: torch.Tensor,
                                context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                                scale: float, max_query_len: int | None = None) -> torch.Tensor:
        out = reference.paged_attention_prefill(
            _to_numpy(query), _to_numpy(key_cache), _to_numpy(value_cache),
            _to_numpy(block_tables), _to_numpy(context_lens), _to_numpy(query_start_loc),
            scale)
        return _to_torch(out, query)

    def copy_blocks(self, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    pairs: list[tuple[int, int]]) -> None:
        kc, vc = _to_numpy(key_cache), _to_numpy(value_cache)
        reference.copy_blocks(kc, vc, pairs)
        _write_back(key_cache, kc)
        _write_back(value_cache, vc)

    def swap_blocks(self, src_cache: torch.Tensor, dst_cache: torch.Tensor,
                    pairs: list[tuple[int, int]]) -> None:
        dst = _to_numpy(dst_cache)
        reference.swap_blocks(_to_numpy(src_cache.to(dst_cache.dtype)), dst, pairs)
        _write_back(dst_cache, dst)
