"""LLaMA (the paper's LLaMA-13B experiments, section 6) over the paged KV cache.

A decoder-only transformer: RMSNorm, rotary position embeddings, grouped-query
attention, a SwiGLU MLP, optionally tied input/output embeddings. Written against the
attention interface of minipaged/attention/base.py: the model runs on a *flat batch* of
the new tokens of every scheduled sequence (a whole prompt for one, a single token for
another), and each layer hands its new K/V to `backend.forward`, which writes them into
the cache blocks named by the slot mapping and attends through the block tables.

Invariant: nothing in this file knows which token belongs to which request. Positions
come in with the tokens, and all cross-token interaction happens inside the backend.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from minipaged.attention.base import AttentionBackend, AttentionMetadata
from minipaged.kernels import cpu_layers
from minipaged.models.config import ModelConfig
from minipaged.models.fused_decode import FusedDecode
from minipaged.models.greedy_head import greedy_tokens
from minipaged.models.layers import (
    Linear,
    RMSNorm,
    RotaryEmbedding,
    empty_param,
    load_checkpoint_weights,
    packed_linear,
)

KVCache = tuple[torch.Tensor, torch.Tensor]
#: a layer's `positions`: the tokens' positions, or the rotary (cos, sin) of them, which
#: the model gathers once per forward and hands to every layer
Positions = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        # one GEMM for q, k and v: rows [q | k | v]
        self.qkv_proj = Linear(config.hidden_size, [self.q_size, self.kv_size, self.kv_size],
                               bias=config.attention_bias, dtype=dtype)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.attention_bias,
                             dtype=dtype)
        self.rotary = rotary   # shared by all layers; not a parameter

    def forward(self, positions: Positions, x: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, backend: AttentionBackend,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output of every row, or only of `rows` (all rows' K/V are cached)."""
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        # rotate q and k together, in place: they are adjacent in the fused output
        qk = qkv[:, :self.q_size + self.kv_size].view(T, self.num_heads + self.num_kv_heads,
                                                      self.head_dim)
        self.rotary(positions, qk)
        q = qk[:, :self.num_heads]
        k = qk[:, self.num_heads:]
        v = qkv[:, self.q_size + self.kv_size:].view(T, self.num_kv_heads, self.head_dim)
        out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, rows)
        return self.o_proj(out.reshape(out.shape[0], self.q_size))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one GEMM."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, [config.intermediate_size] * 2,
                                   bias=config.mlp_bias, dtype=dtype)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size,
                                bias=config.mlp_bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        hidden = cpu_layers.silu_mul(gate_up)        # one C pass, a dense output
        if hidden is None:
            gate, up = gate_up[:, :self.intermediate_size], gate_up[:, self.intermediate_size:]
            # in place on the GEMM's output: one [T, intermediate] pass instead of three
            hidden = F.silu(gate, inplace=True).mul_(up)
        return self.down_proj(hidden)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps, dtype)
        self.self_attn = LlamaAttention(config, rotary, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps, dtype)
        self.mlp = LlamaMLP(config, dtype)

    def forward(self, positions: Positions, x: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: KVCache, meta: AttentionMetadata, backend: AttentionBackend,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (x, residual), where the layer's input is residual + x.

        The stream is carried as a pair so that each skip-connection add is fused with the
        norm after it (the first layer gets residual None: its input is x alone). With
        `rows`, the output holds only those rows (every row's K/V is still cached).
        """
        if residual is None:
            residual = x                    # the stream itself; norms never write x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, kv_cache, meta, backend, rows)
        if rows is not None:
            residual = residual[rows]
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """forward(input_ids [T], positions [T], kv_caches, meta, backend) -> hidden [T, H].

    With `output_rows` (sorted row indices; the model runner passes the rows it samples
    from), the result is hidden [len(output_rows), H], and the last layer computes its
    attention, output projection and MLP for those rows only: the other rows' outputs
    would never be read, while their K/V, which later steps attend to, is still cached.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if config.architecture != "llama":
            raise ValueError(f"config.architecture: {config.architecture!r} is not 'llama'")
        self.config = config
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = empty_param(config.vocab_size, config.hidden_size, dtype=dtype)
        rotary = RotaryEmbedding(config, dtype)
        self.rotary = rotary
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, rotary, dtype)
                                    for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        # a plain attribute, not a submodule: it holds no weights of its own
        self.fused_decode = FusedDecode(self)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata,
                backend: AttentionBackend, output_rows: torch.Tensor | None = None
                ) -> torch.Tensor:
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"kv_caches: {len(kv_caches)} given, the model has "
                             f"{len(self.layers)} layers")
        T = input_ids.shape[0]
        if output_rows is not None and output_rows.numel() == T:
            output_rows = None                       # sorted and distinct: every row
        # a pure decode batch on the CPU: every layer in one C call, when it applies
        fused = self.fused_decode.run(input_ids, positions, kv_caches, meta, backend)
        if fused is not None:
            return fused if output_rows is None else fused[output_rows]
        x = F.embedding(input_ids, self.embed_tokens.weight)
        rope = self.rotary.table(positions)          # gathered once, used by every layer
        residual = None
        last = len(self.layers) - 1
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            x, residual = layer(rope, x, residual, kv_cache, meta, backend,
                                output_rows if i == last else None)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [T, vocab] of final hidden states."""
        if not self.config.tie_word_embeddings:
            return self.lm_head(hidden).float()
        return packed_linear(self.embed_tokens, hidden, self.embed_tokens.weight).float()

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """The argmax token of each row's float32 logits (greedy_head.py's screen where it
        applies: it never forms the whole float32 logits)."""
        head = self.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        found = greedy_tokens(head, hidden, head.weight)
        return self.compute_logits(hidden).argmax(dim=-1) if found is None else found

    # -------------------------------------------------------------------- weights

    _STACKED: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def _resolve(self, hf_name: str) -> tuple[str, int] | None:
        """HF parameter name -> (our parameter name, shard), or None to skip."""
        if "rotary_emb." in hf_name:
            return None                              # a recomputed buffer, not a weight
        if hf_name == "lm_head.weight":
            return None if self.config.tie_word_embeddings else ("lm_head.weight", 0)
        name = hf_name.removeprefix("model.")
        parts = name.split(".")
        # layers.{i}.self_attn.q_proj.weight -> layers.{i}.self_attn.qkv_proj.weight, shard 0
        if len(parts) == 5 and parts[3] in self._STACKED:
            fused, shard = self._STACKED[parts[3]]
            return ".".join(parts[:3] + [fused, parts[4]]), shard
        return name, 0

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill the model from Hugging Face-named tensors (fusing q/k/v and gate/up)."""
        load_checkpoint_weights(self, weights, self._resolve)
