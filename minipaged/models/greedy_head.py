"""Greedy decoding's next token without the full float32 LM head: a bf16 screen whose
error is bounded, then float32 for the few tokens it cannot rule out.

Nothing here is from the paper; it is the serving engine's last product made cheaper.
A greedy row that reports no logprobs needs one thing from its logits: which token is
largest. The LM head is the model's widest product (SmolLM2: 49152 x 576, a fifth of a
decode step's arithmetic), and on a CPU with bf16 dot-product instructions oneDNN runs
it in bf16 about twice as fast as in float32. bf16 logits alone would pick another
token now and then; but their distance from the float32 logits has a bound, per token v,

    |bf16 logit - float32 logit| <= |dh| |w_v| + |hb| |dw_v|           (the roundings)
                                   + gamma (|hb| + |h|) (|w_v| + |dw_v|)  (the sums)
                                   + 2^-8 / (1 - 2^-8) |bf16 logit|      (the result)

(h the hidden state, hb its bf16 rounding, dh = h - hb; w_v the row of the LM head and
dw_v = w_v - bf16(w_v); Cauchy-Schwarz for the roundings' products; gamma = (K + 2) u
for sums of K float32 products, u = 2^-24; the bf16 result is rounded to nearest). A
token whose upper bound is below the best lower bound cannot be the argmax; the rest
(1.5 on average, at most 15, over 8192 rows of a ShareGPT run of SmolLM2) are
rescored in float32 (kernels/cpu_layers.c, greedy_screen_f32).

Used only where it pays: float32 weights and hidden states on the CPU, the C op built,
and the bf16 product measured at most 0.75x the float32 one on this machine (decided
once per process; MINIPAGED_GREEDY_SCREEN=0 turns it off, =1 forces it on, =auto or
unset decides by timing).

Invariant: the token is the first largest of the float32 logits that the C op's own
dot product gives for every token (the screen only skips tokens that cannot win);
against the float32 GEMM's logits it can differ only where two logits are within
float32 summation error of each other, as any two float32 GEMMs can. Like the packed
weights (packed_linear.py), the bf16 copy is used only while the weight is unchanged.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from minipaged.kernels import cpu_layers
from minipaged.models.packed_linear import _LIBRARIES, best_seconds, gemm

SWITCH = "MINIPAGED_GREEDY_SCREEN"
#: the bf16 product must take at most this share of the float32 one's time (the C
#: pass and the rounding of the hidden states cost ~10 % of the float32 product)
PAYS_BELOW = 0.75
_decided: dict[str, bool] = {}


def _bf16_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.bfloat16(), 64)


def _measured_pays(rows: int = 64, n: int = 8192, k: int = 576) -> bool:
    """Whether oneDNN's bf16 product takes at most PAYS_BELOW of the time of the float32
    one the linear layers use here (packed_linear.gemm())."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
    try:
        packed, xb = _pack(w), x.bfloat16()
        if gemm() == "torch":
            f32 = lambda: torch.nn.functional.linear(x, w)            # noqa: E731
        else:
            pack, run = _LIBRARIES[gemm()]
            p32 = pack(w)
            f32 = lambda: run(x, p32, w, None, rows)                  # noqa: E731
        return best_seconds(lambda: _bf16_linear(xb, packed)) <= PAYS_BELOW * best_seconds(f32)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def enabled() -> bool:
    """Whether the screen is used in this process (see the module docstring)."""
    raw = (os.environ.get(SWITCH) or "").strip().lower()    # read each call: tests flip it
    if raw in ("0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return cpu_layers._layers() is not None
    if raw not in ("", "auto"):
        raise ValueError(f"{SWITCH}: {raw!r} is not one of 0, 1, auto (or unset)")
    if "auto" not in _decided:
        with torch.inference_mode():
            _decided["auto"] = cpu_layers._layers() is not None and _measured_pays()
    return _decided["auto"]


def greedy_tokens(owner: nn.Module, hidden: torch.Tensor,
                  weight: torch.Tensor) -> torch.Tensor | None:
    """The float32 argmax token of each row of hidden @ weight.T, through the screen;
    None where the screen does not apply (the caller takes the full logits' argmax)."""
    if (hidden.dtype != torch.float32 or weight.dtype != torch.float32
            or hidden.device.type != "cpu" or weight.device.type != "cpu" or hidden.dim() != 2
            or hidden.shape[1] != weight.shape[1] or hidden.requires_grad
            or weight.requires_grad or not weight.is_contiguous() or not enabled()):
        return None
    cached = owner.__dict__.get("_greedy_screen")
    if cached is None or cached[0] is not weight or cached[1] != weight._version:
        try:
            packed = _pack(weight.detach())
        except (RuntimeError, AttributeError, NotImplementedError):
            return None
        w64 = weight.detach().double()
        # the norms rounded up a little, so that float32 storage never shrinks a bound
        wn = (w64.norm(dim=1) * (1 + 2**-20)).float()
        dwn = ((w64 - weight.detach().bfloat16().double()).norm(dim=1) * (1 + 2**-20)).float()
        cached = (weight, weight._version, packed, wn, dwn)
        owner.__dict__["_greedy_screen"] = cached    # not state: never saved or moved
    h = hidden.contiguous()
    hb = h.bfloat16()
    try:
        logits = _bf16_linear(hb, cached[2])
    except (RuntimeError, NotImplementedError):     # a torch build without it: float32
        return None
    found = cpu_layers.greedy_screen(logits, hb, h, weight.detach(), cached[3], cached[4])
    return None if found is None else found[0]
