"""The building blocks both model families share: linear layers with fused shards, norms, RoPE.

The paper's contribution sits in attention (section 4); everything else in the model is
ordinary. These pieces are written for CPU speed without hiding the math: parameters are
allocated empty (the checkpoint fills them, so no random init is paid), Q/K/V and the
two MLP input projections are stored as one matrix each so a layer runs one GEMM where
it would run three or two, and the rotary cos/sin table is computed once.

Linear layers multiply by a packed copy of their weight, through the faster of MKL's and
oneDNN's packed GEMMs on this machine (`packed_linear`, in packed_linear.py).

Invariant: a fused `Linear` is the row-wise concatenation of its shards, in the order of
`shard_sizes`; `load_shard(i, w)` fills rows sum(shard_sizes[:i]) .. + shard_sizes[i].
Loading a shard writes through `.data`, which bypasses the version counter that
packed_linear checks, so `load_shard` drops the packed copy itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minipaged.kernels import cpu_layers
from minipaged.models.config import ModelConfig
from minipaged.models.packed_linear import drop_packed, packed_linear

_HAS_FUSED_RMS_NORM = hasattr(F, "rms_norm")     # torch >= 2.4


def empty_param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    """An uninitialised, inference-only parameter (the checkpoint overwrites it)."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T + b, with W of shape [sum(shard_sizes), in_features]."""

    def __init__(self, in_features: int, shard_sizes: list[int] | int, bias: bool,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.shard_sizes = [shard_sizes] if isinstance(shard_sizes, int) else list(shard_sizes)
        self.weight = empty_param(sum(self.shard_sizes), in_features, dtype=dtype)
        self.bias = empty_param(sum(self.shard_sizes), dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(self, x, self.weight, self.bias)

    def load_shard(self, shard: int, param: str, tensor: torch.Tensor) -> None:
        """Copy a checkpoint tensor (one shard's weight or bias) into its rows."""
        # writes through .data bypass the version counter: drop any packed copy by hand
        drop_packed(self)
        start = sum(self.shard_sizes[:shard])
        target = getattr(self, param)
        if target is None:
            raise ValueError(f"the checkpoint has a {param} this layer was built without")
        copy_checked(target.data[start:start + self.shard_sizes[shard]], tensor)


def copy_checked(target: torch.Tensor, tensor: torch.Tensor) -> None:
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"shape {tuple(tensor.shape)} does not match the model's "
                         f"{tuple(target.shape)}")
    target.copy_(tensor)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w, computed in float32 (as transformers does).

    forward(x) -> normed; forward(x, residual) -> (normed residual + x, residual + x):
    the decoder's skip connection fused with the norm that follows it (vLLM's
    fused_add_rms_norm). The sum is written into `residual` in place.
    """

    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = empty_param(size, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        fast = cpu_layers.rms_norm(x, self.weight, self.eps, residual)   # one C pass
        if fast is not None:
            return fast if residual is None else (fast, residual)
        if residual is not None:
            residual.add_(x)
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and _HAS_FUSED_RMS_NORM:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = empty_param(size, dtype=dtype)
        self.bias = empty_param(size, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """theta^(-2i/d) in float32, computed as transformers computes it (bit-identical table)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta
                      ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float) / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv_freq / s["factor"]
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    middle = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(middle, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with transformers' rotate_half pairing (i with i + D/2).

    cos/sin [max_positions, D/2] are tabulated once; a step only gathers its rows.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(config)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.int64).float()
        freqs = positions[:, None] * inv_freq[None, :]
        self.register_buffer("cos", freqs.cos().to(dtype), persistent=False)
        self.register_buffer("sin", freqs.sin().to(dtype), persistent=False)

    def table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D/2] of these positions: gathered once per step, then every
        layer's `forward` reuses them (the positions are the same in all layers)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def forward(self, positions: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                x: torch.Tensor) -> None:
        """Rotate x [T, heads, D] in place (x may be a view into the fused QKV output).

        positions: the tokens' positions, or their `table(positions)`.
        """
        cos, sin = self.table(positions) if isinstance(positions, torch.Tensor) else positions
        if cpu_layers.rotary_(x, cos.squeeze(1), sin.squeeze(1)):   # one C pass, same rounding
            return
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        # transformers' rounding exactly: each product rounded, then added
        rotated_1 = x1 * cos - x2 * sin
        x1_sin = x1 * sin
        x2.mul_(cos).add_(x1_sin)             # x2 cos + x1 sin, in place
        x1.copy_(rotated_1)


def load_checkpoint_weights(model: nn.Module, weights, resolve) -> None:
    """Stream (HF name, tensor) pairs into `model`; every parameter must be filled once.

    resolve(hf_name) -> (our parameter name, shard index), or None to skip the tensor
    (buffers like rotary inv_freq, a tied lm_head). Raises ValueError naming the tensor
    on a shape mismatch, an unknown name, or a parameter the checkpoint never provides.
    """
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    loaded: set[tuple[str, int]] = set()
    unexpected = []
    for name, tensor in weights:
        target = resolve(name)
        if target is None:
            continue
        pname, shard = target
        if pname not in params:
            unexpected.append(name)
            continue
        module_name, _, attr = pname.rpartition(".")
        module = modules[module_name]
        try:
            if isinstance(module, Linear):
                module.load_shard(shard, attr, tensor)
            else:
                copy_checked(params[pname].data, tensor)
        except ValueError as e:
            raise ValueError(f"weights: checkpoint tensor {name!r}: {e}") from e
        loaded.add((pname, shard))
    if unexpected:
        raise ValueError(f"weights: the checkpoint has tensors this model does not use: "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    expected = set()
    for pname in params:
        module = modules[pname.rpartition(".")[0]]
        shards = len(module.shard_sizes) if isinstance(module, Linear) else 1
        expected.update((pname, i) for i in range(shards))
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"weights: the checkpoint lacks {len(missing)} tensors, e.g. "
                         f"{missing[:5]} (parameter, shard)")
