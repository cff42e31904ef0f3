"""Call the C PagedAttention kernels for the CPU: decode and cache writes
(kernels/cpu_paged_attention.c) and prompts (kernels/cpu_paged_prefill.c).

The torch backend's portable path gathers each sequence's blocks into a contiguous
workspace and calls SDPA: every K/V byte is read, written, then read again. On the CPU,
where decode attention is bound by memory, the C kernel that reads K/V in place inside
their blocks is several times faster (benchmarks/kernels.py; inside a SmolLM2 decode
step of 64 sequences, attention went ~190 -> ~60 ms), and the gather's copies no longer
push the weights and activations out of the caches. The prefill kernel is blocked like
FlashAttention (prompts are bound by arithmetic, not memory). The layer ops (RMSNorm with
the residual add fused, rotary, the greedy sampler's argmax + log-sum-exp) replace
several torch passes over a few tens of KB each.

Each source is compiled on first use and loaded through ctypes (kernels/cpu_build.py).
Where there is no compiler, or MINIPAGED_CPU_KERNEL=0 is set, `load()` returns None
and every caller keeps its torch path: the kernels are a speed-up, never a requirement.

Invariant: a kernel is only handed what it was written for (float32 CPU tensors in the
layout of DESIGN.md section 3); every wrapper checks dtypes, shapes, strides and the
block ids it will dereference before it passes a raw pointer, and declines (returns
None / False) or raises ValueError otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minipaged.kernels.cpu_build import load


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
