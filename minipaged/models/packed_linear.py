"""The linear layers' matrix product on the CPU: multiply by a *packed* copy of the weight,
through whichever of MKL's and oneDNN's packed fp32 GEMMs is faster on this machine.

Nothing here is from the paper; it is why the model around the paged attention is fast.
A GEMM library copies ("packs") the weight matrix into its blocked layout before it
multiplies. On every call, F.linear re-packs: at decode batch sizes (16-128 rows) that
costs as much as the multiply itself. So each weight is packed once and reused.

Two libraries in torch's CPU build can do that, and which is faster depends on the CPU:

- MKL (`torch.ops.mkl._mkl_linear`): measured on an Intel Xeon (2 threads, SmolLM2's
  shapes): 122 -> 172 GFLOP/s at 64 rows, 61 -> 137 at 16, against F.linear. Its result
  equals F.linear's bit for bit above a few rows (F.linear runs the same MKL kernel).
- oneDNN (`torch.ops.mkldnn._linear_pointwise`, what torch's graph compiler and vLLM's
  CPU build use): on an AMD EPYC (Zen 5), where MKL runs its AVX2 code, 190 -> 430-480
  GFLOP/s at 64 rows, because oneDNN uses the full AVX-512 units.

Where a weight matrix is exactly the float32 form of 4-bit codes and scales (a model
loaded from a Q4_1 file: the default model is one), products of up to 256 rows read it
in that form instead (kernels/cpu_4bit_linear.c): a decode step's products wait on the
weights streaming from memory, and the codes are 5.3x fewer bytes. The weights rebuilt
in the caches are the same float32 values, bit for bit. MINIPAGED_4BIT_WEIGHTS=0 turns
this off (the throughput benchmark reports both).

`gemm()` decides once per process: MINIPAGED_GEMM=mkl|onednn|torch if set, otherwise
each library that gives F.linear's results on a small check is timed on one decode-sized
product and the faster wins (MKL unless oneDNN is clearly faster, by 15 %, since MKL
matches F.linear exactly); torch's F.linear is the fallback. Both packed ops are private
torch ops; any failure falls back to F.linear for good.

Invariant: a packed copy (either form) is only ever used while the weight is unchanged
(its identity and version are checked on every call), so loading or editing weights can
never leave a stale copy in use; the result is F.linear's up to fp32 summation order.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minipaged.kernels import cpu_4bit

Pack = Callable[[torch.Tensor], torch.Tensor]
Run = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", int],
               torch.Tensor]

# 64: a row-count hint both libraries use for sizing; the packed data serves any count
_LIBRARIES: dict[str, tuple[Pack, Run]] = {
    "mkl": (lambda w: torch.ops.mkl._mkl_reorder_linear_weight(w, 64),
            lambda x, p, w, b, rows: torch.ops.mkl._mkl_linear(x, p, w, b, rows)),
    "onednn": (lambda w: torch.ops.mkldnn._reorder_linear_weight(w, 64),
               lambda x, p, w, b, rows: torch.ops.mkldnn._linear_pointwise(
                   x, p, b, "none", [], "")),
}
_CHOICE: str | None = None
CLEARLY_FASTER = 1.15          # oneDNN must beat MKL by this much to be chosen
#: above this many rows a product is bound by arithmetic, and the float32 GEMM's own
#: packed copy is as fast (measured on SmolLM2's shapes: 4-bit 6-20 % faster at 16-256
#: rows, 0-5 % slower at 512-2048)
FOUR_BIT_MAX_ROWS = 256
FOUR_BIT_SWITCH = "MINIPAGED_4BIT_WEIGHTS"
_four_bit_switch: list = [None, True]   # the variable's last value seen, and what it meant


def _works(name: str) -> bool:
    """Whether the library's packed GEMM is there and gives F.linear's results (fp32
    summation order aside) at row counts from 1 to 200, with and without a bias."""
    pack, run = _LIBRARIES[name]
    try:
        g = torch.Generator().manual_seed(0)
        w, b = torch.randn(48, 40, generator=g), torch.randn(48, generator=g)
        with torch.inference_mode():
            packed = pack(w)
            return all(torch.allclose(run(x, packed, w, bias, rows), F.linear(x, w, bias),
                                      rtol=1e-4, atol=1e-4)
                       for rows in (1, 3, 64, 200) for bias in (None, b)
                       for x in [torch.randn(rows, 40, generator=g)])
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def best_seconds(call: Callable[[], object], repeats: int = 8, warm_up: int = 2) -> float:
    """The fastest of `repeats` timed calls, the first `warm_up` of them not counted."""
    best = float("inf")
    for i in range(repeats):
        t0 = time.perf_counter()
        call()
        if i >= warm_up:
            best = min(best, time.perf_counter() - t0)
    return best


def _seconds(name: str, rows: int = 64, n: int = 1536, k: int = 576) -> float:
    """Best of a few timed [rows, k] x [k, n] products (SmolLM2's gate+up at decode)."""
    pack, run = _LIBRARIES[name]
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
    with torch.inference_mode():
        packed = pack(w)
        return best_seconds(lambda: run(x, packed, w, None, rows))


def gemm() -> str:
    """The GEMM this process uses for fp32 linear layers on the CPU: "mkl", "onednn" or
    "torch" (F.linear). Decided on first call (see the module docstring)."""
    global _CHOICE
    if _CHOICE is None:
        wanted = os.environ.get("MINIPAGED_GEMM", "").strip().lower()
        if wanted and wanted not in ("mkl", "onednn", "torch"):
            raise ValueError(f"MINIPAGED_GEMM: {wanted!r} is not one of mkl, onednn, torch")
        if wanted:
            _CHOICE = wanted if wanted == "torch" or _works(wanted) else "torch"
        else:
            working = [name for name in _LIBRARIES if _works(name)]
            if len(working) == 2:
                fast = _seconds("mkl") > CLEARLY_FASTER * _seconds("onednn")
                _CHOICE = "onednn" if fast else "mkl"
            else:
                _CHOICE = working[0] if working else "torch"
    return _CHOICE


def packed_linear(owner: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through a packed copy of `weight` kept on `owner` where
    that is possible (fp32 on the CPU, no autograd); F.linear elsewhere."""
    library = gemm()
    if (library == "torch" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or x.device.type != "cpu" or x.requires_grad or weight.requires_grad
            or x.shape[-1] != weight.shape[1]):
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if rows <= FOUR_BIT_MAX_ROWS and four_bit_enabled():
        packed = _four_bit_form(owner, weight)
        y = None if packed is None else cpu_4bit.linear_4bit(x, packed, weight.shape[0], bias)
        if y is not None:
            return y
    pack, run = _LIBRARIES[library]
    # kept in __dict__, not as a buffer: it is not state (never saved, moved or loaded)
    # (weight, its version, library, packed copy): a copy packed for one library is
    # meaningless to the other, so the library is part of what must match
    cached = owner.__dict__.get("_packed_weight")
    if (cached is None or cached[0] is not weight
            or (cached[1], cached[2]) != (weight._version, library)):
        cached = (weight, weight._version, library, pack(weight.detach()))
        owner.__dict__["_packed_weight"] = cached
    return run(x, cached[3], weight, bias, rows)


def four_bit_enabled() -> bool:
    """False when MINIPAGED_4BIT_WEIGHTS is 0 / false / no / off, or the fast kernel
    was not built here."""
    raw = os.environ.get(FOUR_BIT_SWITCH)      # read each call: benchmarks flip it
    if raw != _four_bit_switch[0]:
        off = (raw or "1").strip().lower() in ("0", "false", "no", "off")
        _four_bit_switch[:] = [raw, not off]
    return _four_bit_switch[1] and cpu_4bit.available()


def four_bit_weight(layer: nn.Module) -> torch.Tensor | None:
    """The packed 4-bit form that `packed_linear` reads for a float32 product of at most
    FOUR_BIT_MAX_ROWS rows through `layer` (a Linear: `weight`, `bias`), or None where it
    would not read one (4-bit reads off or not built here, GEMM "torch", a weight or
    bias it does not take, or a weight with no exact 4-bit form)."""
    weight, bias = layer.weight, layer.bias
    if (gemm() == "torch" or not four_bit_enabled() or weight.dtype != torch.float32
            or weight.device.type != "cpu" or weight.requires_grad
            or (bias is not None and (bias.dtype != torch.float32 or bias.requires_grad
                                      or bias.shape != (weight.shape[0],)
                                      or not bias.is_contiguous()))):
        return None
    return _four_bit_form(layer, weight)


def _four_bit_form(owner: nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
    """The weight's exact 4-bit form, or None if it has none; looked for once per
    weight (and version), and kept on `owner` like the float32 packed copy."""
    cached = owner.__dict__.get("_packed_4bit")
    if cached is None or cached[0] is not weight or cached[1] != weight._version:
        cached = (weight, weight._version, cpu_4bit.pack_exact_4bit(weight))
        owner.__dict__["_packed_4bit"] = cached
    return cached[2]


def drop_packed(owner: nn.Module) -> None:
    """Forget `owner`'s packed copies (for writes that bypass the version counter)."""
    owner.__dict__.pop("_packed_weight", None)
    owner.__dict__.pop("_packed_4bit", None)
