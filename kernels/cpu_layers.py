"""Call the C layer ops for the CPU (kernels/cpu_layers.c, built by `cpu_build.load`):
RMSNorm with the residual add fused, the rotary embedding in place, the MLP's
silu(gate) * up, and the greedy sampler's row reductions: argmax + log-sum-exp of each
row of logits, and the second half of the bf16 greedy screen (models/greedy_head.py).

Nothing here is from the paper; these are the small per-token ops of the model around
the paged attention. At decode sizes (a few tens of KB per op), one pass in C costs less
than waking torch's threads for the several passes its own ops take.

Invariant: an op is only handed what it was written for (contiguous float32 CPU
tensors of the shapes below); otherwise it returns None / False, writes nothing, and the
caller keeps its torch path. The results round exactly as transformers' ops do (the
source is built without contraction into fused multiply-adds).
"""

from __future__ import annotations

import ctypes

import torch

from minipaged.kernels.cpu_build import load


def _layers() -> ctypes.CDLL | None:
    return load("cpu_layers")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """weight * v / sqrt(mean(v^2) + eps) row by row, v = x, or v = residual + x with the
    sum written into `residual` (the skip connection, fused). None where the C op does
    not apply (then nothing was written)."""
    lib = _layers()
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if (lib is None or any(t.dtype != torch.float32 or t.device.type != "cpu"
                           or not t.is_contiguous() for t in tensors)
            or (residual is not None and residual.shape != x.shape)
            or weight.shape != x.shape[-1:]):
        return None
    n = x.shape[-1]
    out = torch.empty_like(x)
    lib.rms_norm_f32(out.data_ptr(), x.data_ptr(),
                     None if residual is None else residual.data_ptr(), weight.data_ptr(),
                     x.numel() // n if n else 0, n, n, float(eps))
    return out


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotate x [T, heads, D] in place by the rows cos, sin [T, D/2] (rotate_half
    pairing). False where the C op does not apply (then x is untouched)."""
    lib = _layers()
    if (lib is None or x.dtype != torch.float32 or cos.dtype != torch.float32
            or sin.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 3
            or x.stride(2) != 1 or x.stride(1) != x.shape[2]
            or not (cos.is_contiguous() and sin.is_contiguous())
            or cos.shape != (x.shape[0], x.shape[2] // 2) or sin.shape != cos.shape):
        return False
    lib.rotary_f32(x.data_ptr(), x.shape[0], x.stride(0), x.shape[1], x.shape[2],
                   cos.data_ptr(), sin.data_ptr())
    return True


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up [T, n] of the gate+up product [T, 2n] (gate the first n columns),
    as a new dense tensor, in one C pass. None where the C op does not apply."""
    lib = _layers()
    if (lib is None or gate_up.dtype != torch.float32 or gate_up.device.type != "cpu"
            or gate_up.dim() != 2 or gate_up.stride(1) != 1 or gate_up.shape[1] % 2):
        return None
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, n, dtype=torch.float32)
    if rows and n:
        lib.silu_mul_f32(out.data_ptr(), gate_up.data_ptr(), rows, n, gate_up.stride(0))
    return out


def argmax_logsumexp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(argmax, logsumexp) of each row of x [rows, n], in one C call: what greedy sampling
    needs. The argmax is the first largest value's index (torch.argmax's choice). None
    where the C op does not apply, or if a row holds a NaN."""
    lib = _layers()
    if (lib is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2
            or x.stride(1) != 1 or x.shape[1] == 0):
        return None
    idx = torch.empty(x.shape[0], dtype=torch.int64)
    lse = torch.empty(x.shape[0], dtype=torch.float32)
    if lib.argmax_logsumexp_f32(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0),
                                idx.data_ptr(), lse.data_ptr()):
        return None
    return idx, lse


def greedy_screen(lb: torch.Tensor, hb: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
                  wn: torch.Tensor, dwn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(tokens, candidates) per row, from the bf16 logits lb [rows, V] of hb = h.bfloat16()
    [rows, K] against the bf16-rounded w [V, K] (wn, dwn [V]: the norms of w's rows and
    of their bf16 rounding errors): each row's float32 argmax, found by rescoring the
    tokens the error bound cannot rule out (see greedy_screen_f32 in cpu_layers.c).
    None where the C op does not apply or a row holds a NaN or an infinity."""
    lib = _layers()
    rows, k = h.shape if h.dim() == 2 else (0, 0)
    vocab = w.shape[0]
    if (lib is None or h.dim() != 2 or lb.dtype != torch.bfloat16 or hb.dtype != torch.bfloat16
            or any(t.dtype != torch.float32 for t in (h, w, wn, dwn))
            or any(t.device.type != "cpu" or not t.is_contiguous() for t in (hb, h, w, wn, dwn))
            or lb.device.type != "cpu" or lb.dim() != 2 or lb.stride(1) != 1
            or lb.shape != (rows, vocab) or hb.shape != h.shape or w.shape != (vocab, k)
            or wn.shape != (vocab,) or dwn.shape != (vocab,) or vocab == 0):
        return None
    tokens = torch.empty(rows, dtype=torch.int64)
    candidates = torch.empty(rows, dtype=torch.int64)
    if rows and lib.greedy_screen_f32(lb.data_ptr(), lb.stride(0), hb.data_ptr(), h.data_ptr(),
                                      rows, k, w.data_ptr(), wn.data_ptr(), dwn.data_ptr(),
                                      vocab, tokens.data_ptr(), candidates.data_ptr()):
        return None
    return tokens, candidates
