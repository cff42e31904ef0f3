"""The shape of a model, read from a Hugging Face `config.json` (paper section 6 models).

The paper evaluates OPT (13B/66B/175B) and LLaMA (13B); minipaged runs both families.
`ModelConfig` is the one flat description every other part uses: the models build their
layers from it, the cache engine sizes the KV blocks from `num_layers`, `num_kv_heads`
and `head_dim`, and the engine stops on `eos_token_ids`.

Invariant: `num_heads` is a multiple of `num_kv_heads` (grouped-query attention: query
head h reads KV head h // (num_heads // num_kv_heads)); OPT always has the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: HF `architectures` entry -> our architecture name
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "OPTForCausalLM": "opt",
}


@dataclass
class ModelConfig:
    """Everything the forward pass and the KV cache need to know about a model.

    Shared: architecture ("llama" | "opt"), vocab_size, hidden_size, num_layers,
    num_heads, num_kv_heads, head_dim, intermediate_size (OPT's ffn_dim),
    max_position_embeddings, norm_eps, tie_word_embeddings, bos_token_id, eos_token_ids.
    LLaMA: rope_theta, rope_scaling (None, or a dict with rope_type "linear" / "llama3"),
    attention_bias, mlp_bias. OPT: do_layer_norm_before (False = post-LN, as OPT-350m),
    word_embed_proj_dim (!= hidden_size adds project_in/project_out), activation,
    enable_bias, final_layer_norm.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    attention_bias: bool = False
    mlp_bias: bool = False
    # OPT
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    activation: str = "silu"
    enable_bias: bool = True
    final_layer_norm: bool = True
    #: the dtype the checkpoint was saved in ("float32", "bfloat16", ...), informational
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES.values():
            raise ValueError(f"architecture: {self.architecture!r} is not one of "
                             f"{sorted(SUPPORTED_ARCHITECTURES.values())}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size

    @property
    def kv_bytes_per_token(self) -> int:
        """Elements of K and V one token holds across all layers (times the dtype size = bytes)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face `config.json` dict (LlamaForCausalLM or OPTForCausalLM)."""
        arch = _architecture_of(cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        if arch == "llama":
            return _llama_config(cfg, eos_ids)
        return _opt_config(cfg, eos_ids)


def _architecture_of(cfg: dict[str, Any]) -> str:
    names = list(cfg.get("architectures") or [])
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    # a config without `architectures` still says its family in model_type
    if not names and cfg.get("model_type") in SUPPORTED_ARCHITECTURES.values():
        return cfg["model_type"]
    found = ", ".join(names) if names else f"model_type={cfg.get('model_type')!r}"
    raise ValueError(f"unsupported model architecture {found}; supported: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def _llama_config(cfg: dict[str, Any], eos_ids: list[int]) -> ModelConfig:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act: LLaMA models here use 'silu', the config says {act!r}")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    # transformers >= 5 nests theta and scaling in rope_parameters; older configs keep them flat
    rope = dict(cfg.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope else None)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind not in ("linear", "llama3"):
            raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported "
                             "(supported: default, linear, llama3)")
    return ModelConfig(
        architecture="llama",
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        intermediate_size=cfg["intermediate_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        attention_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        activation="silu",
        torch_dtype=_dtype_name(cfg),
    )


def _opt_config(cfg: dict[str, Any], eos_ids: list[int]) -> ModelConfig:
    act = cfg.get("activation_function", "relu")
    if act not in ("relu", "gelu"):
        raise ValueError(f"activation_function: {act!r} is not supported (relu, gelu)")
    if not cfg.get("layer_norm_elementwise_affine", True):
        raise ValueError("layer_norm_elementwise_affine: OPT without LayerNorm weights is not supported")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    pre_ln = bool(cfg.get("do_layer_norm_before", True))
    return ModelConfig(
        architecture="opt",
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=cfg["ffn_dim"],
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        norm_eps=1e-5,                       # OPT's nn.LayerNorm default
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        do_layer_norm_before=pre_ln,
        word_embed_proj_dim=cfg.get("word_embed_proj_dim") or hidden,
        activation=act,
        enable_bias=bool(cfg.get("enable_bias", True)),
        # OPT-350m (post-LN) has no final layer norm; transformers reads the same two flags
        final_layer_norm=pre_ln and not cfg.get("_remove_final_layer_norm", False),
        torch_dtype=_dtype_name(cfg),
    )


def _dtype_name(cfg: dict[str, Any]) -> str | None:
    value = cfg.get("torch_dtype") or cfg.get("dtype")
    return str(value).replace("torch.", "") if value is not None else None
