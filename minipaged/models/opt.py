"""OPT (the paper's main models, OPT-13B/66B/175B, section 6) over the paged KV cache.

OPT differs from LLaMA in the ordinary parts only: learned absolute positions (row
position + 2 of the table), LayerNorm with bias, a ReLU MLP with biases, multi-head
attention (no grouping), an lm_head tied to the input embeddings, and two variants:
post-LayerNorm layers (do_layer_norm_before=False, as OPT-350m) and an embedding
narrower than the model (word_embed_proj_dim, bridged by project_in / project_out).
The attention step is the same call as in llama.py: `backend.forward` writes the new
K/V through the slot mapping and attends through the block tables.

Invariant: the positions given are the tokens' positions in their sequence (0-based);
the +2 offset of OPT's table is applied here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from minipaged.attention.base import AttentionBackend, AttentionMetadata
from minipaged.models.config import ModelConfig
from minipaged.models.greedy_head import greedy_tokens
from minipaged.models.layers import (
    LayerNorm,
    Linear,
    empty_param,
    load_checkpoint_weights,
)

KVCache = tuple[torch.Tensor, torch.Tensor]
POSITION_OFFSET = 2     # fairseq reserved rows 0-1 of the position table for padding


class OPTAttention(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.size = config.hidden_size
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = Linear(self.size, [self.size] * 3, bias=config.enable_bias, dtype=dtype)
        self.out_proj = Linear(self.size, self.size, bias=config.enable_bias, dtype=dtype)

    def forward(self, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
                backend: AttentionBackend, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output of every row, or only of `rows` (all rows' K/V are cached)."""
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, rows)
        return self.out_proj(out.reshape(out.shape[0], self.size))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        eps, size = config.norm_eps, config.hidden_size
        self.pre_ln = config.do_layer_norm_before
        self.self_attn = OPTAttention(config, dtype)
        self.self_attn_layer_norm = LayerNorm(size, eps, dtype)
        self.fc1 = Linear(size, config.intermediate_size, bias=config.enable_bias, dtype=dtype)
        self.fc2 = Linear(config.intermediate_size, size, bias=config.enable_bias, dtype=dtype)
        self.final_layer_norm = LayerNorm(size, eps, dtype)
        self.act = F.relu if config.activation == "relu" else F.gelu

    def forward(self, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
                backend: AttentionBackend, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output for every row, or only for `rows` (see OPTForCausalLM)."""
        skip = x if rows is None else x[rows]
        if self.pre_ln:       # x + f(norm(x))
            x = skip + self.self_attn(self.self_attn_layer_norm(x), kv_cache, meta, backend,
                                      rows)
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        # post-LN (OPT-350m): norm(x + f(x))
        x = self.self_attn_layer_norm(skip + self.self_attn(x, kv_cache, meta, backend, rows))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class OPTForCausalLM(nn.Module):
    """forward(input_ids [T], positions [T], kv_caches, meta, backend) -> hidden [T, E].

    E is word_embed_proj_dim (= hidden_size unless the model projects), the width of the
    tied embedding matrix that compute_logits multiplies by. With `output_rows`, as in
    LlamaForCausalLM: hidden [len(output_rows), E], the last layer computing only those
    rows after caching every row's K/V.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if config.architecture != "opt":
            raise ValueError(f"config.architecture: {config.architecture!r} is not 'opt'")
        self.config = config
        embed_dim, size = config.word_embed_proj_dim, config.hidden_size
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = empty_param(config.vocab_size, embed_dim, dtype=dtype)
        self.embed_positions = nn.Module()
        self.embed_positions.weight = empty_param(
            config.max_position_embeddings + POSITION_OFFSET, size, dtype=dtype)
        self.project_in = self.project_out = None
        if embed_dim != size:
            self.project_in = Linear(embed_dim, size, bias=False, dtype=dtype)
            self.project_out = Linear(size, embed_dim, bias=False, dtype=dtype)
        self.layers = nn.ModuleList(OPTDecoderLayer(config, dtype)
                                    for _ in range(config.num_layers))
        self.final_layer_norm = (LayerNorm(size, config.norm_eps, dtype)
                                 if config.final_layer_norm else None)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(embed_dim, config.vocab_size, bias=False, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata,
                backend: AttentionBackend, output_rows: torch.Tensor | None = None
                ) -> torch.Tensor:
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"kv_caches: {len(kv_caches)} given, the model has "
                             f"{len(self.layers)} layers")
        if output_rows is not None and output_rows.numel() == input_ids.shape[0]:
            output_rows = None                       # sorted and distinct: every row
        x = F.embedding(input_ids, self.embed_tokens.weight)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + F.embedding(positions + POSITION_OFFSET, self.embed_positions.weight)
        last = len(self.layers) - 1
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches)):
            x = layer(x, kv_cache, meta, backend, output_rows if i == last else None)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [T, vocab] of final hidden states."""
        head = self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(hidden, head).float()

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """The argmax token of each row's float32 logits (through greedy_head.py's screen
        where it applies)."""
        head = self.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        found = greedy_tokens(head, hidden, head.weight)
        return self.compute_logits(hidden).argmax(dim=-1) if found is None else found

    # -------------------------------------------------------------------- weights

    _STACKED: ClassVar[dict[str, int]] = {"q_proj": 0, "k_proj": 1, "v_proj": 2}

    def _resolve(self, hf_name: str) -> tuple[str, int] | None:
        """HF parameter name -> (our parameter name, shard), or None to skip."""
        if hf_name == "lm_head.weight":
            return None if self.config.tie_word_embeddings else ("lm_head.weight", 0)
        # facebook/opt-* checkpoints name the decoder "decoder.", save_pretrained "model.decoder."
        name = hf_name.removeprefix("model.").removeprefix("decoder.")
        parts = name.split(".")
        # layers.{i}.self_attn.q_proj.bias -> layers.{i}.self_attn.qkv_proj.bias, shard 0
        if len(parts) == 5 and parts[3] in self._STACKED:
            return ".".join(parts[:3] + ["qkv_proj", parts[4]]), self._STACKED[parts[3]]
        return name, 0

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill the model from Hugging Face-named tensors (fusing q/k/v)."""
        load_checkpoint_weights(self, weights, self._resolve)
