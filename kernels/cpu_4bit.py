"""Call the 4-bit-weight linear layer for the CPU (kernels/cpu_4bit_linear.c): find the
exact 4-bit form of a float32 weight matrix, and multiply by it.

Nothing here is from the paper. The default model's weights were loaded from a Q4_1
file, so each run of 32 weights in a row is fl(fl(d * q) + m) for 4-bit codes q and two
scales. At decode sizes a linear layer waits on its weights coming from memory; read as
codes and scales they are 5.3x fewer bytes, and the kernel rebuilds the same float32
values in the caches. The result is the float32 product of the same weights, in another
summation order (as oneDNN's and MKL's orders differ from each other).

Invariant: `pack_exact_4bit` returns a packed form only if it rebuilds every weight bit
for bit (the C code checks each one); for any other matrix it returns None and the
caller keeps its float32 GEMM. `linear_4bit` declines (None) anything it was not
written for.
"""

from __future__ import annotations

import torch

from minipaged.kernels.cpu_build import load

PANEL, QBLOCK, BLOCK_BYTES = 32, 32, 768     # as in cpu_4bit_linear.c


_fast: dict[int, bool] = {}      # id(library) -> whether it was built with AVX-512


def available() -> bool:
    """Whether the fast (AVX-512) kernel was built on this machine (asked of the library
    once; every linear layer's call checks it)."""
    lib = load("cpu_4bit_linear")
    if lib is None:
        return False
    if id(lib) not in _fast:
        _fast[id(lib)] = bool(lib.has_fast_4bit_linear())
    return _fast[id(lib)]


def packed_bytes(out_features: int, in_features: int) -> int:
    return out_features // PANEL * (in_features // QBLOCK) * BLOCK_BYTES


def pack_exact_4bit(weight: torch.Tensor) -> torch.Tensor | None:
    """The packed 4-bit form (uint8) of weight [N, K] float32, or None where there is
    none: a value no block's codes and scales rebuild exactly, N or K not a multiple of
    32, or no compiled kernel."""
    lib = load("cpu_4bit_linear")
    if (lib is None or weight.dtype != torch.float32 or weight.device.type != "cpu"
            or weight.dim() != 2 or weight.shape[0] % PANEL or weight.shape[1] % QBLOCK
            or weight.numel() == 0):
        return None
    w = weight.detach().contiguous()
    out = torch.empty(packed_bytes(*w.shape), dtype=torch.uint8)
    if lib.pack_4bit_f32(w.data_ptr(), w.shape[0], w.shape[1], out.data_ptr()) != 0:
        return None
    return out


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, out_features: int,
                bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [..., K] @ W^T + bias -> [..., N], W given by `pack_exact_4bit`; None where the
    call does not fit the kernel (then nothing was computed)."""
    lib = load("cpu_4bit_linear")
    k = x.shape[-1]
    if (lib is None or x.dtype != torch.float32 or x.device.type != "cpu"
            or packed.dtype != torch.uint8 or packed.numel() != packed_bytes(out_features, k)
            or out_features % PANEL or k % QBLOCK or x.requires_grad
            or (bias is not None and (bias.dtype != torch.float32 or bias.shape != (out_features,)
                                      or not bias.is_contiguous()))):
        return None
    rows = x.reshape(-1, k) if x.dim() != 2 else x
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    y = torch.empty(m, out_features, dtype=torch.float32)
    if m:
        lib.linear_4bit_f32(y.data_ptr(), rows.data_ptr(), rows.stride(0), packed.data_ptr(),
                            None if bias is None else bias.data_ptr(), m, out_features, k)
    return y.reshape(*x.shape[:-1], out_features)
