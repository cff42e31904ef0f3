"""The executable definition of both model families, in plain NumPy (no torch, no paging).

The paper serves OPT and LLaMA (section 6). This module is what those two networks
*compute*, written for reading: one sequence, a contiguous causal attention, weights
looked up by their Hugging Face names, everything in float64. The torch models in
llama.py / opt.py compute the same function through the paged KV cache, fused weights
and a backend; the tests hold all of them, and transformers, to these numbers.

Invariant: `numpy_forward(config, weights, ids)[t]` depends only on ids[0..t] (causal),
which is exactly why a KV cache (paged or not) can reuse the keys and values of earlier
tokens instead of recomputing them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from minipaged.models.config import ModelConfig


def numpy_forward(config: ModelConfig, weights: Mapping[str, np.ndarray],
                  token_ids: Sequence[int]) -> np.ndarray:
    """Logits [T, vocab] (float64) of one sequence, from HF-named weights."""
    ids = np.asarray(token_ids, dtype=np.int64)
    w = _Float64(weights)
    if config.architecture == "llama":
        return _llama(config, w, ids)
    if config.architecture == "opt":
        return _opt(config, w, ids)
    raise ValueError(f"config.architecture: {config.architecture!r} is not llama or opt")


class _Float64(dict):
    """weights[name] as float64, converted when first read (not all 1 GB at once up front)."""

    def __init__(self, weights: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.source = weights

    def __missing__(self, name: str) -> np.ndarray:
        return np.asarray(self.source[name], dtype=np.float64)

    def __contains__(self, name: object) -> bool:
        return name in self.source

    def get(self, name: str, default=None):
        return self[name] if name in self.source else default


# ----------------------------------------------------------------------------- pieces

def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def linear(x: np.ndarray, w: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """x @ W^T (+ b): HF stores Linear weights as [out_features, in_features]."""
    y = x @ w[name + ".weight"].T
    bias = w.get(name + ".bias")
    return y if bias is None else y + bias


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu(x: np.ndarray) -> np.ndarray:
    from math import erf
    return 0.5 * x * (1.0 + np.vectorize(erf)(x / math.sqrt(2.0)))


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """q [T, H, D], k/v [T, H_kv, D] -> [T, H, D]; token t sees tokens 0..t.

    Grouped-query attention: query head h uses KV head h // (H // H_kv).
    """
    T, H, D = q.shape
    group = H // k.shape[1]
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("thd,shd->hts", q, k) / math.sqrt(D)
    scores = np.where(np.tril(np.ones((T, T), dtype=bool))[None], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Rotary frequencies theta^(-2i/d), with the optional linear / llama3 rescaling."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv_freq / s["factor"]
    # llama3: long wavelengths slowed by `factor`, short ones kept, the middle interpolated
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    middle = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(middle, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def apply_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate x [T, H, D] by angle position * inv_freq, HF's rotate_half convention.

    Dimension i pairs with dimension i + D/2 (not with i + 1, as in the paper of RoPE):
    x_i' = x_i cos - x_{i+D/2} sin,  x_{i+D/2}' = x_{i+D/2} cos + x_i sin.
    """
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]      # [T, D/2]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# ----------------------------------------------------------------------------- LLaMA

def _llama(config: ModelConfig, w: Mapping[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    T, H, Hkv, D = len(ids), config.num_heads, config.num_kv_heads, config.head_dim
    positions = np.arange(T)
    inv_freq = rope_inv_freq(config)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], config.norm_eps)
        q = linear(h, w, p + "self_attn.q_proj").reshape(T, H, D)
        k = linear(h, w, p + "self_attn.k_proj").reshape(T, Hkv, D)
        v = linear(h, w, p + "self_attn.v_proj").reshape(T, Hkv, D)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        x = x + linear(causal_attention(q, k, v).reshape(T, H * D), w, p + "self_attn.o_proj")
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], config.norm_eps)
        gate, up = linear(h, w, p + "mlp.gate_proj"), linear(h, w, p + "mlp.up_proj")
        x = x + linear(silu(gate) * up, w, p + "mlp.down_proj")               # SwiGLU
    x = rms_norm(x, w["model.norm.weight"], config.norm_eps)
    head = w["model.embed_tokens.weight"] if config.tie_word_embeddings else w["lm_head.weight"]
    return x @ head.T


# ----------------------------------------------------------------------------- OPT

OPT_POSITION_OFFSET = 2   # OPT's learned position table starts at row 2 (fairseq padding legacy)


def _opt(config: ModelConfig, w: Mapping[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    T, H, D = len(ids), config.num_heads, config.head_dim
    eps = config.norm_eps
    pre_ln = config.do_layer_norm_before
    w = _Float64({("model." + k if k.startswith("decoder.") else k): v
                  for k, v in w.source.items()})
    d = "model.decoder."
    act = (lambda z: np.maximum(z, 0.0)) if config.activation == "relu" else gelu

    def ln(z: np.ndarray, name: str) -> np.ndarray:
        return layer_norm(z, w[name + ".weight"], w[name + ".bias"], eps)

    x = w[d + "embed_tokens.weight"][ids]
    if d + "project_in.weight" in w:
        x = linear(x, w, d + "project_in")
    x = x + w[d + "embed_positions.weight"][np.arange(T) + OPT_POSITION_OFFSET]
    for i in range(config.num_layers):
        p = f"{d}layers.{i}."
        h = ln(x, p + "self_attn_layer_norm") if pre_ln else x
        q = linear(h, w, p + "self_attn.q_proj").reshape(T, H, D)
        k = linear(h, w, p + "self_attn.k_proj").reshape(T, H, D)
        v = linear(h, w, p + "self_attn.v_proj").reshape(T, H, D)
        x = x + linear(causal_attention(q, k, v).reshape(T, H * D), w, p + "self_attn.out_proj")
        if not pre_ln:
            x = ln(x, p + "self_attn_layer_norm")
        h = ln(x, p + "final_layer_norm") if pre_ln else x
        x = x + linear(act(linear(h, w, p + "fc1")), w, p + "fc2")
        if not pre_ln:
            x = ln(x, p + "final_layer_norm")
    if config.final_layer_norm:
        x = ln(x, d + "final_layer_norm")
    if d + "project_out.weight" in w:
        x = linear(x, w, d + "project_out")
    head = w.get("lm_head.weight") if not config.tie_word_embeddings else None
    return x @ (w[d + "embed_tokens.weight"] if head is None else head).T
