"""A LLaMA decode step in one C call (kernels/cpu_decode_step.c): the CPU's counterpart
of the CUDA graphs vLLM captures for decode.

Not the paper's subject: it is about the interpreter, not the cache. A decode step of
SmolLM2 runs 30 layers of ten small C kernels each, and between them Python checks
shapes, makes views and allocates outputs. Timed alone that glue is cheap (~17 us
around a linear layer), but inside a step the paged attention has just streamed the
K/V of every sequence through the caches, and the interpreter's code and objects come
back from memory: 85-145 us around the same call (Zen 4-class host, 2026-12-06; see
"The decode step in one call" in docs/concepts/kernel.md). `FusedDecode.run` checks
everything once per step, then hands the C driver the kernels (as function pointers),
the layers' weights and caches (an array built once and reused while nothing changed)
and a workspace, and the driver calls the same kernels, in the same order, with
nothing between them.

It runs only where the Python forward would have run exactly those kernels: a pure
decode batch of at most FOUR_BIT_MAX_ROWS sequences, float32 on the CPU, every weight
read in its exact 4-bit form, the torch backend using its C decode kernel. Anywhere
else `run` returns None and the model's Python forward runs; MINIPAGED_FUSED_DECODE=0
turns it off (the benchmarks time both).

Invariant: the hidden states and the caches after a fused step are bit for bit those of
the Python forward on the same batch (tests/test_fused_decode.py), because the driver
computes nothing itself.
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.nn.functional as F

from minipaged.attention.base import AttentionBackend, AttentionMetadata
from minipaged.attention.torch_backend import TorchBackend
from minipaged.kernels import cpu_4bit, cpu_build, cpu_kernel
from minipaged.models.packed_linear import (FOUR_BIT_MAX_ROWS, four_bit_enabled,
                                             four_bit_weight, gemm)

SWITCH = "MINIPAGED_FUSED_DECODE"
_P = ctypes.c_void_p


class _Kernels(ctypes.Structure):
    _fields_ = [(name, _P) for name in
                ("rms_norm", "linear", "rotary", "write_kv", "attention", "silu_mul")]


class _Layer(ctypes.Structure):
    _fields_ = [(name, _P) for name in
                ("input_norm", "post_norm", "qkv", "o", "gate_up", "down", "qkv_bias",
                 "o_bias", "gate_up_bias", "down_bias", "key_cache", "value_cache")]


class _Dims(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "block_size")
                ] + [("eps", ctypes.c_float), ("scale", ctypes.c_float)]


#: the workspace's buffers, in the driver's order, and each one's width
_WORK = ("residual", "x", "normed", "qkv", "attn", "gate_up", "act")


class _Work(ctypes.Structure):
    _fields_ = [(name, _P) for name in _WORK]


def enabled() -> bool:
    """False when MINIPAGED_FUSED_DECODE is 0 / false / no / off (read on every step)."""
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _address(lib: ctypes.CDLL, name: str) -> int:
    return ctypes.cast(getattr(lib, name), _P).value


class FusedDecode:
    """The fused decode step of one LlamaForCausalLM (its `forward` calls `run`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        # (fingerprint, the driver's array, what keeps the fingerprint's ids alive)
        self._layers: tuple[tuple, ctypes.Array, tuple] | None = None
        self._workspace = torch.empty(0)
        self._kernels, self._kernels_of = _Kernels(), None   # the pointers, and their libraries
        self.steps_run = 0           # fused steps so far (tests and the profile read it)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
            backend: AttentionBackend) -> torch.Tensor | None:
        """The model's final hidden states [T, hidden] for this decode batch, or None
        where the fused step does not apply (then nothing was computed or written)."""
        T = input_ids.shape[0]
        if not (enabled() and meta.is_decode and 0 < T <= FOUR_BIT_MAX_ROWS
                and meta.num_seqs == T and input_ids.device.type == "cpu"
                and self.model.embed_tokens.weight.dtype == torch.float32
                and self._backend_ok(backend, kv_caches)):
            return None
        libs = self._libraries()
        layers = self._layer_array(kv_caches) if libs else None
        if layers is None:
            return None
        config, (key_cache, _) = self.model.config, kv_caches[0]
        num_blocks, block_size = key_cache.shape[:2]
        # the checks every layer's cache write and attention would make, made once
        plan = cpu_kernel.plan_decode(meta.block_tables, meta.context_lens, num_blocks,
                                      block_size)
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        if slots.shape != (T,) or int(slots.max()) >= num_blocks * block_size:
            raise ValueError("slot_mapping must name one slot inside the cache per token")
        x = F.embedding(input_ids, self.model.embed_tokens.weight)
        rotary = self.model.rotary
        cos, sin = rotary.cos[positions].contiguous(), rotary.sin[positions].contiguous()
        work = self._work(T)
        ptrs = _Work(*[w.data_ptr() for w in work.values()])
        first = self.model.layers[0]
        dims = _Dims(config.hidden_size, config.num_heads, config.num_kv_heads,
                     config.head_dim, config.intermediate_size, block_size,
                     first.input_layernorm.eps, first.self_attn.scale)
        status = libs.llama_decode_step_f32(
            ctypes.byref(self._kernels), layers, len(self.model.layers), ctypes.byref(dims),
            x.data_ptr(), T, cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
            plan.tables.data_ptr(), plan.tables.stride(0), plan.lens.data_ptr(),
            ctypes.byref(ptrs))
        if status:
            raise ValueError(f"the decode kernel refused head_dim {config.head_dim}")
        self.steps_run += 1
        return self.model.norm(work["x"], work["residual"])[0]

    def _backend_ok(self, backend: AttentionBackend, kv_caches: list) -> bool:
        """Whether the Python forward's attention would be the C decode kernel, on caches
        it takes (float32 CPU, contiguous, head_dim a multiple of 8 up to 256)."""
        config = self.model.config
        head_dim = config.head_dim
        if not (isinstance(backend, TorchBackend) and backend.c_kernel is not False
                and head_dim % 8 == 0 and head_dim <= 256
                and config.num_heads % config.num_kv_heads == 0
                and len(kv_caches) == len(self.model.layers)):
            return False
        shape = (config.num_kv_heads, head_dim)
        return all(k.device.type == "cpu" and k.dtype == torch.float32 and k.is_contiguous()
                   and v.dtype == torch.float32 and v.is_contiguous() and k.shape == v.shape
                   and tuple(k.shape[2:]) == shape for k, v in kv_caches)

    def _libraries(self) -> ctypes.CDLL | None:
        """The driver, once the kernels it calls are all built here (else None)."""
        driver = cpu_build.load("cpu_decode_step")
        libs = [cpu_build.load(name) for name in
                ("cpu_layers", "cpu_4bit_linear", "cpu_paged_attention")]
        if driver is None or None in libs or not cpu_4bit.available():
            return None
        if self._kernels_of != libs:          # the same libraries: the same addresses
            layers, linear, attention = libs
            self._kernels = _Kernels(
                _address(layers, "rms_norm_f32"), _address(linear, "linear_4bit_f32"),
                _address(layers, "rotary_f32"), _address(attention, "write_kv_f32"),
                _address(attention, "paged_attention_decode_f32"),
                _address(layers, "silu_mul_f32"))
            self._kernels_of = libs
        return driver

    def _layer_array(self, kv_caches: list) -> ctypes.Array | None:
        """Every layer's weights (4-bit forms) and caches as the driver's array; rebuilt
        only when what it was built from changed. None if some weight has no 4-bit form
        the Python forward would read."""
        if self._layers is not None and self._layers[0] == self._fingerprint(kv_caches):
            return self._layers[1]
        tensors = []
        for layer, (key_cache, value_cache) in zip(self.model.layers, kv_caches):
            linears = _linears(layer)
            packed = [four_bit_weight(lin) for lin in linears]
            if None in packed:
                return None
            norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            if any(n.dtype != torch.float32 or not n.is_contiguous() for n in norms):
                return None
            tensors.append((*norms, *packed, *(lin.bias for lin in linears),
                            key_cache, value_cache))
        array = (_Layer * len(tensors))()
        for i, row in enumerate(tensors):
            array[i] = _Layer(*(None if t is None else t.data_ptr() for t in row))
        # The fingerprint holds ids: the tensors and packed forms they name are kept with
        # it, so that no id can be reused by another object while it is compared.
        packed_forms = [lin.__dict__.get("_packed_4bit") for layer in self.model.layers
                        for lin in _linears(layer)]
        self._layers = (self._fingerprint(kv_caches), array, (tensors, packed_forms))
        return array

    def _fingerprint(self, kv_caches: list) -> tuple:
        """What the layer array is built from, cheaply (~0.3 ms a step for SmolLM2's 30
        layers, against ~2.5 ms for asking `four_bit_weight` of each layer): the switches that decide
        whether a weight is read in 4 bits, and the identity and version of every weight,
        bias, norm and cache, and of each linear's packed form (which a repack replaces
        and a write through `.data` drops)."""
        parts: list = [gemm(), four_bit_enabled()]
        for layer, (key_cache, value_cache) in zip(self.model.layers, kv_caches):
            for lin in _linears(layer):
                weight, bias = _param(lin, "weight"), _param(lin, "bias")
                parts += (id(weight), weight._version, id(lin.__dict__.get("_packed_4bit")),
                          id(bias), None if bias is None else bias._version)
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                weight = _param(norm, "weight")
                parts += (id(weight), weight._version)
            parts += (id(key_cache), id(value_cache))
        return tuple(parts)

    def _work(self, T: int) -> dict[str, torch.Tensor]:
        """The step's buffers, views into one workspace kept between steps (a fresh
        2 MB allocation per step would be paid in page faults)."""
        c = self.model.config
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        widths = dict(residual=c.hidden_size, x=c.hidden_size, normed=c.hidden_size,
                      qkv=q + 2 * kv, attn=q, gate_up=2 * c.intermediate_size,
                      act=c.intermediate_size)
        need = T * sum(widths.values())
        if self._workspace.numel() < need:
            self._workspace = torch.empty(need, dtype=torch.float32)
        views, at = {}, 0
        for name in _WORK:
            views[name] = self._workspace[at:at + T * widths[name]].view(T, widths[name])
            at += T * widths[name]
        return views


def _linears(layer: torch.nn.Module) -> tuple:
    attn, mlp = layer.self_attn, layer.mlp
    return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj


def _param(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """module.<name> without nn.Module's __getattr__ (a few times faster; called ~200
    times a step)."""
    found = module._parameters.get(name)
    return found if found is not None else module.__dict__.get(name)
