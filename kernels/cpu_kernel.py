"""Build and call the C kernels for the CPU: PagedAttention decode and cache writes
(kernels/cpu_paged_attention.c) and PagedAttention for prompts (kernels/cpu_paged_prefill.c);
this module also builds kernels/cpu_layers.c, a decoder step's small layer ops, which
`cpu_layers` wraps.

The torch backend's portable path gathers each sequence's blocks into a contiguous
workspace and calls SDPA: every K/V byte is read, written, then read again. On the CPU,
where decode attention is bound by memory, the C kernel that reads K/V in place inside
their blocks is several times faster (benchmarks/kernels.py; inside a SmolLM2 decode
step of 64 sequences, attention went ~190 -> ~60 ms), and the gather's copies no longer
push the weights and activations out of the caches. The prefill kernel is blocked like
FlashAttention (prompts are bound by arithmetic, not memory). The layer ops (RMSNorm with
the residual add fused, rotary, the greedy sampler's argmax + log-sum-exp) replace
several torch passes over a few tens of KB each.

Each source is compiled on first use with the system C compiler (~1 s; cached under
~/.cache/minipaged/kernels by a hash of the source, the flags and the compiler) and
called through ctypes, which releases the GIL. Where there is no compiler, or
MINIPAGED_CPU_KERNEL=0 is set, `load()` returns None and every caller keeps its torch
path: the kernels are a speed-up, never a requirement.

Invariant: a kernel is only handed what it was written for (float32 CPU tensors in the
layout of DESIGN.md section 3); every wrapper checks dtypes, shapes, strides and the
block ids it will dereference before it passes a raw pointer, and declines (returns
None / False) or raises ValueError otherwise.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

KERNELS = Path(__file__).resolve().parent
#: source file -> compiler flags. Attention may reassociate its sums (-ffast-math: the
#: order differs from the reference's anyway, and it lets expf vectorise); the layer
#: ops must round exactly as transformers does (no contraction into fused multiply-adds).
SOURCES = {
    "cpu_paged_attention": ["-O3", "-march=native", "-ffast-math", "-fopenmp"],
    "cpu_paged_prefill": ["-O3", "-march=native", "-ffast-math", "-fopenmp"],
    "cpu_layers": ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"],
    # the GEMM fuses its multiply-adds; the weights' rebuild is marked fp-contract=off
    "cpu_4bit_linear": ["-O3", "-march=native", "-fopenmp"],
    # only calls the kernels above, through pointers: no arithmetic of its own
    "cpu_decode_step": ["-O2"],
}
ENV_SWITCH = "MINIPAGED_CPU_KERNEL"
_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
#: name -> (restype, argtypes) of every exported function
SIGNATURES = {
    "paged_attention_decode_f32": (_I32, [_P, _I64, _P, _P, _P, _I64, _P, _P, _I32, _I32,
                                          _I32, _I32, _I32, _F32]),
    "paged_attention_prefill_f32": (_I32, [_P, _I64, _P, _P, _P, _I64, _P, _P, _P, _I32,
                                           _I32, _I32, _I32, _I32, _F32]),
    "write_kv_f32": (None, [_P, _P, _I64, _I64, _P, _P, _P, _I64, _I64]),
    "rms_norm_f32": (None, [_P, _P, _P, _P, _I64, _I64, _I64, _F32]),
    "rotary_f32": (None, [_P, _I64, _I64, _I64, _I64, _P, _P]),
    "silu_mul_f32": (None, [_P, _P, _I64, _I64, _I64]),
    "argmax_logsumexp_f32": (_I32, [_P, _I64, _I64, _I64, _P, _P]),
    "greedy_screen_f32": (_I32, [_P, _I64, _P, _P, _I64, _I64, _P, _P, _P, _I64, _P, _P]),
    "pack_4bit_f32": (_I32, [_P, _I64, _I64, _P]),
    "linear_4bit_f32": (None, [_P, _P, _I64, _P, _P, _I64, _I64, _I64]),
    "has_fast_4bit_linear": (_I32, []),
    "llama_decode_step_f32": (_I32, [_P, _P, _I64, _P, _P, _I64, _P, _P, _P, _P, _I64, _P,
                                     _P]),
}

_libs: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("MINIPAGED_CACHE", "~/.cache/minipaged")).expanduser() / "kernels"


_switch: list = [None, True]     # the last value of the variable seen, and what it meant


def enabled() -> bool:
    """False when MINIPAGED_CPU_KERNEL is set to 0 / false / no / off."""
    raw = os.environ.get(ENV_SWITCH)        # read each call: tests flip it at run time
    if raw != _switch[0]:
        _switch[:] = [raw, (raw or "1").strip().lower() not in ("0", "false", "no", "off")]
    return _switch[1]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(compiler: str, name: str = "cpu_paged_attention") -> Path:
    """Compile kernels/{name}.c (once per source, flags and compiler); the .so's path."""
    source, flags = KERNELS / f"{name}.c", [*SOURCES[name], "-shared", "-fPIC"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(source.read_bytes() + " ".join(flags).encode() + version.encode())
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # build beside the target, then rename: two processes may build at once
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *flags, str(source), "-o", tmp, "-lm"], check=True,
                           capture_output=True, text=True)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def load(name: str = "cpu_paged_attention") -> ctypes.CDLL | None:
    """The compiled kernels/{name}.c, or None (disabled, no compiler, or the build failed).

    Call it after `import torch` (this module does): the library then binds to the
    OpenMP runtime torch has loaded.
    """
    if not enabled():
        return None
    if name in _libs:
        return _libs[name]
    _libs[name] = None
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(build(compiler, name)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        warnings.warn(f"kernels/{name}.c could not be built; using the torch ops instead: "
                      f"{detail.strip()[:500]}", RuntimeWarning, stacklevel=2)
        return None
    for fn_name, (restype, argtypes) in SIGNATURES.items():
        if hasattr(lib, fn_name):
            fn = getattr(lib, fn_name)
            fn.restype, fn.argtypes = restype, argtypes
    _libs[name] = lib
    return lib


def supports(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
    """Whether the decode kernel can run this call (float32 caches on the CPU,
    contiguous, head_dim a multiple of 8 up to 256)."""
    return (_caches_ok(key_cache, value_cache) and query.shape[1] % key_cache.shape[2] == 0
            and key_cache.shape[3] % 8 == 0 and key_cache.shape[3] <= 256)


def _caches_ok(key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
    return (key_cache.device.type == "cpu" and key_cache.dtype == torch.float32
            and value_cache.dtype == torch.float32 and key_cache.is_contiguous()
            and value_cache.is_contiguous() and key_cache.shape == value_cache.shape)


@dataclass(frozen=True)
class DecodePlan:
    """A decode batch's block tables and context lengths, checked and in the kernel's
    types. Every layer of a step shares them, so they are prepared once per step."""

    tables: torch.Tensor     # [num_seqs, width] int64, contiguous
    lens: torch.Tensor       # [num_seqs] int64


def plan_decode(block_tables: torch.Tensor, context_lens: torch.Tensor, num_blocks: int,
                block_size: int) -> DecodePlan:
    """Check what the kernel will dereference: raises ValueError rather than let it read
    outside the cache."""
    tables = block_tables.to(torch.int64).contiguous()
    lens = context_lens.to(torch.int64).contiguous()
    if tables.dim() != 2 or lens.shape != (tables.shape[0],):
        raise ValueError("block_tables and context_lens must have one row per sequence")
    if not len(lens):
        return DecodePlan(tables, lens)
    max_len = int(lens.max())
    if int(lens.min()) < 1 or -(-max_len // block_size) > tables.shape[1]:
        raise ValueError("every context must hold 1 .. table width * block_size tokens")
    if int(tables.min()) < 0 or int(tables.max()) >= num_blocks:
        # only the entries up to each context are read; padding past them may be anything
        used = torch.arange(tables.shape[1])[None, :] < (-(-lens // block_size))[:, None]
        read = tables[used]
        if int(read.min()) < 0 or int(read.max()) >= num_blocks:
            raise ValueError("block_tables name a block outside the cache")
    return DecodePlan(tables, lens)


def paged_attention_decode(query: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float,
                           plan: DecodePlan | None = None) -> torch.Tensor:
    """query [S, H, D] -> out [S, H, D], attending over each sequence's paged context.

    Same contract as AttentionBackend.paged_attention_decode; `supports()` must hold.
    `plan` (from `plan_decode` on the same tables and lengths) skips the checks.
    """
    lib = load()
    if lib is None:
        raise RuntimeError("the C decode kernel is not available")
    num_seqs, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"query heads {num_heads} x {head_dim} do not fit a cache of "
                         f"{num_kv_heads} x {cache_head_dim}")
    plan = plan or plan_decode(block_tables, context_lens, num_blocks, block_size)
    if plan.tables.shape[0] != num_seqs:
        raise ValueError("block_tables and context_lens must have one row per sequence")
    q = query.to(torch.float32)
    if q.shape[0] and not q[0].is_contiguous():
        q = q.contiguous()      # each sequence's heads side by side; rows may be apart
    out = torch.empty(q.shape, dtype=torch.float32)
    status = lib.paged_attention_decode_f32(
        q.data_ptr(), q.stride(0), key_cache.data_ptr(), value_cache.data_ptr(),
        plan.tables.data_ptr(), plan.tables.stride(0), plan.lens.data_ptr(), out.data_ptr(),
        num_seqs, num_heads, num_kv_heads, head_dim, block_size, float(scale))
    if status != 0:
        raise ValueError(f"head_dim must be a multiple of 8 up to 256, got {head_dim}")
    return out.to(query.dtype)


@dataclass(frozen=True)
class PrefillPlan:
    """A prefill batch's checked tables, lengths and query offsets (int64), shared by
    every layer of a step."""

    decode: DecodePlan
    starts: torch.Tensor     # [num_seqs + 1] int64 query_start_loc


def plan_prefill(block_tables: torch.Tensor, context_lens: torch.Tensor,
                 query_start_loc: torch.Tensor, num_tokens: int, num_blocks: int,
                 block_size: int) -> PrefillPlan:
    """plan_decode's checks, plus: the queries of sequence i are rows
    query_start_loc[i] .. query_start_loc[i+1] - 1, at least one and at most its context."""
    decode = plan_decode(block_tables, context_lens, num_blocks, block_size)
    starts = query_start_loc.to(torch.int64).contiguous()
    if starts.shape != (decode.lens.shape[0] + 1,):
        raise ValueError("query_start_loc must have one entry per sequence, plus one")
    q_lens = starts[1:] - starts[:-1]
    if len(q_lens) and (int(starts[0]) != 0 or int(starts[-1]) != num_tokens
                        or int(q_lens.min()) < 1 or bool((q_lens > decode.lens).any())):
        raise ValueError("query_start_loc must split the query rows into runs of "
                         "1 .. context_len tokens, one per sequence")
    return PrefillPlan(decode, starts)


def paged_attention_prefill(query: torch.Tensor, key_cache: torch.Tensor,
                            value_cache: torch.Tensor, block_tables: torch.Tensor,
                            context_lens: torch.Tensor, query_start_loc: torch.Tensor,
                            scale: float, plan: PrefillPlan | None = None
                            ) -> torch.Tensor | None:
    """query [T, H, D] -> out [T, H, D]: each new token attends causally over its
    sequence's paged context (AttentionBackend.paged_attention_prefill's contract).
    None when the kernel does not cover these shapes (the caller uses its torch path)."""
    lib = load("cpu_paged_prefill")
    if lib is None or not supports(query, key_cache, value_cache):
        return None
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"query heads {num_heads} x {head_dim} do not fit a cache of "
                         f"{num_kv_heads} x {cache_head_dim}")
    plan = plan or plan_prefill(block_tables, context_lens, query_start_loc, num_tokens,
                                num_blocks, block_size)
    q = query.to(torch.float32)
    if q.shape[0] and not q[0].is_contiguous():
        q = q.contiguous()
    out = torch.empty(q.shape, dtype=torch.float32)
    status = lib.paged_attention_prefill_f32(
        q.data_ptr(), q.stride(0), key_cache.data_ptr(), value_cache.data_ptr(),
        plan.decode.tables.data_ptr(), plan.decode.tables.stride(0),
        plan.decode.lens.data_ptr(), plan.starts.data_ptr(), out.data_ptr(),
        plan.decode.lens.shape[0], num_heads, num_kv_heads, head_dim, block_size, float(scale))
    return out.to(query.dtype) if status == 0 else None


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """x [T, ...] with each token's row contiguous (a view when it already is)."""
    inner = x[0].is_contiguous() if x.shape[0] else True
    return x if inner and x.stride(-1) == 1 else x.contiguous()


#: the slot mapping write_kv checked last: (tensor, cache slots, its checked int64 copy)
_checked_slots: list = [None, 0, None]


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """reshape_and_cache in C for float32 CPU tensors; False (nothing written) where it
    does not apply, so the caller falls back to torch."""
    lib = load()
    if (lib is None or key.dtype != torch.float32 or value.dtype != torch.float32
            or not _caches_ok(key_cache, value_cache)):
        return False
    num_tokens = key.shape[0]
    row = key_cache.shape[2] * key_cache.shape[3]
    num_slots = key_cache.shape[0] * key_cache.shape[1]
    if slot_mapping.shape != (num_tokens,) or key.shape[1:] != key_cache.shape[2:]:
        raise ValueError("key, value and slot_mapping must have one row per token")
    checked = _checked_slots
    if (checked[0] is slot_mapping and checked[1] == num_slots
            and torch.equal(checked[2], slot_mapping)):
        slots = checked[2]          # every layer of a step writes through the same mapping
    else:
        # a copy, compared by value next time: inference tensors keep no version counter
        slots = slot_mapping.to(torch.int64, copy=True).contiguous()
        if num_tokens and int(slots.max()) >= num_slots:
            raise ValueError("slot_mapping names a slot outside the cache")
        checked[:] = [slot_mapping, num_slots, slots]
    k, v = _token_rows(key), _token_rows(value)
    lib.write_kv_f32(k.data_ptr(), v.data_ptr(), k.stride(0), v.stride(0),
                     key_cache.data_ptr(), value_cache.data_ptr(), slots.data_ptr(),
                     num_tokens, row)
    return True
