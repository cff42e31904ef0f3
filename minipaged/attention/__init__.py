"""Attention backends behind one interface (paper section 4.1): pick one by name.

- "numpy": the executable definitions of kernels/reference.py (slow, for checking);
- "torch": block gather + fused attention, the fast path on the CPU;
- "triton": the PagedAttention kernels of kernels/, for GPUs (or the interpreter);
- "auto": "triton" on CUDA, "torch" elsewhere.

Invariant: every backend gives the reference's numbers (within its dtype's tolerance)
for the same AttentionMetadata; a model never needs to know which one it runs on.
"""

from __future__ import annotations

import torch

from minipaged.attention.base import AttentionBackend, AttentionMetadata

BACKENDS = ("auto", "numpy", "torch", "triton")

__all__ = ["AttentionBackend", "AttentionMetadata", "BACKENDS", "get_attn_backend"]


def get_attn_backend(name: str = "auto", device: str | torch.device = "cpu",
                     ) -> AttentionBackend:
    """A new backend instance; `name` is the engine's `attention_backend` argument."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(map(repr, BACKENDS))}; "
                         f"got {name!r}")
    if name == "auto":
        name = "triton" if torch.device(device).type == "cuda" else "torch"
    if name == "numpy":
        from minipaged.attention.numpy_backend import NumpyBackend
        return NumpyBackend()
    if name == "torch":
        from minipaged.attention.torch_backend import TorchBackend
        return TorchBackend()
    from minipaged.attention.triton_backend import TritonBackend   # imports triton: lazily
    return TritonBackend()
