"""Hypothesis strategies shared by the whole suite, and the suite's hypothesis profiles.

Profiles: "ci" (used when CI is set, and by default) has no deadline (the machine is
shared and the Triton interpreter is slow), a bounded example count and a fixed seed
so a CI run is reproducible; "dev" explores more; "quick" is for iterating.
Pick one with HYPOTHESIS_PROFILE=dev.

Sections below: memory core (block ids, workloads), kernels (shapes), engine (workloads).
Keep each strategy here, not in a test module, so every test draws from the same space.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=100,
    stateful_step_count=40,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=500,
    stateful_step_count=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("quick", deadline=None, max_examples=20, stateful_step_count=20)

#: examples each RuleBasedStateMachine runs in CI (issue 2 asks for at least 200)
STATE_MACHINE_EXAMPLES = 200


def load_profile() -> None:
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# ---------------------------------------------------------------------------------------
# Memory core
# ---------------------------------------------------------------------------------------

block_sizes = st.sampled_from([1, 2, 4, 8, 16])
token_ids = st.integers(min_value=0, max_value=50)   # a small vocabulary makes prefix hits likely
prompts = st.lists(token_ids, min_size=1, max_size=40)
contiguous_policies = st.sampled_from(["max", "pow2", "oracle"])   # paper's Orca baselines
# Memory-report workloads: (operation, size[, size]) steps, sizes small against the pools.
paged_report_ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "append", "fork", "free"]), st.integers(1, 9)),
    max_size=30,
)
contiguous_report_ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "append", "free"]), st.integers(1, 16),
              st.integers(0, 16)),
    max_size=30,
)

# The paged memory core's state machines use tiny pools, blocks and vocabularies, so that
# exhaustion, eviction, copy-on-write and prefix hits (also hash collisions, and equal
# blocks after different prefixes) all happen within a few steps.
tiny_block_sizes = st.sampled_from([1, 2, 3, 4])
tiny_token_ids = st.integers(min_value=0, max_value=2)
_TINY_SYSTEM_PROMPT = [0, 1, 2, 2, 1, 0, 0, 2, 1, 1, 2, 0]
#: half of them begin with a prefix of one fixed text, as requests sharing a system
#: prompt do, so prefix-cache hits (and near misses) are common
tiny_prompts = st.one_of(
    st.lists(tiny_token_ids, min_size=1, max_size=10),
    st.builds(lambda n, tail: _TINY_SYSTEM_PROMPT[:n] + tail, st.integers(0, 10),
              st.lists(tiny_token_ids, max_size=3)).filter(len),
)
watermarks = st.sampled_from([0.0, 0.0, 0.1, 0.3])
#: steps per state-machine example for the memory core: tiny pools fill up in fewer
MEMORY_CORE_STEPS = 25


def colliding_hash(parent_hash: int | None, tokens) -> int:
    """A deliberately bad chain hash: 3 values, so unrelated blocks collide all the time."""
    return hash((parent_hash, tuple(tokens))) % 3


def constant_hash(parent_hash: int | None, tokens) -> int:
    """The worst chain hash: every block collides with every other."""
    return 0


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------
# Every strategy here returns NumPy arrays (float32 data, int32/int64 indices); tests
# cast to the dtype and device they need. Sizes are small on purpose so that the Triton
# interpreter can run the same cases. Unused cache slots always hold NaN: a kernel that
# reads one (or multiplies a masked weight 0 by it) produces NaN and fails.

#: block sizes a kernel must accept (all powers of two, as vLLM's kernels support)
kernel_block_sizes = st.sampled_from([1, 2, 4, 8, 16, 32])
#: head sizes, including non-powers of two that a Triton kernel must pad with a mask
kernel_head_dims = st.sampled_from([16, 24, 32, 40, 64])
#: (num_heads, num_kv_heads): GQA ratios 1, 2, 3, 8 and all-to-one (num_kv_heads = 1)
kernel_head_configs = st.sampled_from([
    (1, 1), (2, 2), (4, 4),        # multi-head attention (ratio 1)
    (4, 2), (2, 1),                # ratio 2
    (9, 3), (6, 2),                # ratio 3 (SmolLM2: 9 query heads, 3 KV heads)
    (8, 1), (16, 2),               # ratio 8
    (3, 1), (5, 1),                # all-to-one, odd group sizes
])


def layout_paged(keys: list[np.ndarray], values: list[np.ndarray], block_size: int,
                 rng: np.random.Generator, spare_blocks: int = 0, pad_columns: int = 0,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scatter contiguous per-sequence K/V [ctx_i, H_kv, D] into shuffled paged caches.

    Every physical block is assigned at random (a permutation of the pool, which holds
    `spare_blocks` more blocks than needed); slots no sequence owns hold NaN. Returns
    (key_cache, value_cache, block_tables); block_tables is int32, padded with 0 up to
    max blocks + pad_columns (0 is a valid block id, so padding must never be read).
    """
    num_kv_heads, head_dim = keys[0].shape[1:]
    blocks_per_seq = [-(-len(k) // block_size) for k in keys]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    physical = rng.permutation(num_blocks)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = np.full(shape, np.nan, dtype=keys[0].dtype)
    value_cache = np.full(shape, np.nan, dtype=values[0].dtype)
    block_tables = np.zeros((len(keys), max(blocks_per_seq) + pad_columns), dtype=np.int32)
    next_block = 0
    for s, (k, v) in enumerate(zip(keys, values)):
        table = physical[next_block:next_block + blocks_per_seq[s]]
        next_block += blocks_per_seq[s]
        block_tables[s, :len(table)] = table
        t = np.arange(len(k))
        key_cache[table[t // block_size], t % block_size] = k
        value_cache[table[t // block_size], t % block_size] = v
    return key_cache, value_cache, block_tables


@dataclass
class PagedAttentionCase:
    """One batch for paged attention, in the layout of DESIGN.md section 3.

    The new tokens of sequence i are the last `query_lens[i]` of its `context_lens[i]`
    tokens; their K/V (`key`, `value`) are *already* in the caches at `slot_mapping`, so
    `paged_attention_*` can be called directly, and `forward` can be tested by first
    blanking those slots. `keys` / `values` hold each sequence's context contiguously.
    """

    query: np.ndarray            # [num_tokens, num_heads, head_dim] float32
    key: np.ndarray              # [num_tokens, num_kv_heads, head_dim] the new tokens' K
    value: np.ndarray            # [num_tokens, num_kv_heads, head_dim] the new tokens' V
    key_cache: np.ndarray        # [num_blocks, block_size, num_kv_heads, head_dim], NaN unused
    value_cache: np.ndarray
    block_tables: np.ndarray     # [num_seqs, max_blocks] int32, padded with 0
    context_lens: np.ndarray     # [num_seqs] int32
    query_start_loc: np.ndarray  # [num_seqs + 1] int32
    slot_mapping: np.ndarray     # [num_tokens] int64, slots of the new tokens
    keys: list[np.ndarray]       # per sequence [context_len, num_kv_heads, head_dim]
    values: list[np.ndarray]
    scale: float

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def num_heads(self) -> int:
        return self.query.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.key_cache.shape[2]

    @property
    def head_dim(self) -> int:
        return self.query.shape[2]

    @property
    def block_size(self) -> int:
        return self.key_cache.shape[1]

    @property
    def query_lens(self) -> np.ndarray:
        return np.diff(self.query_start_loc)

    @property
    def max_query_len(self) -> int:
        return int(self.query_lens.max())

    @property
    def max_context_len(self) -> int:
        return int(self.context_lens.max())


@st.composite
def _context_len(draw, block_size: int, max_len: int) -> int:
    """Ragged lengths, with length 1 and exact multiples of the block size made likely."""
    multiples = [m * block_size for m in range(1, max_len // block_size + 1)]
    choices = [st.just(1), st.integers(1, max_len)]
    if multiples:
        choices.append(st.sampled_from(multiples))
    return draw(st.one_of(*choices))


@st.composite
def paged_attention_cases(draw, decode: bool = False, max_seqs: int = 4,
                          max_context_len: int = 200, max_tokens: int = 400,
                          block_sizes=kernel_block_sizes, head_dims=kernel_head_dims,
                          head_configs=kernel_head_configs) -> PagedAttentionCase:
    """A random paged-attention batch: ragged contexts, shuffled blocks, NaN elsewhere.

    decode=True gives one new token per sequence; otherwise each sequence brings
    1..context_len new tokens (fewer than the context = a cached prefix before them).
    max_tokens bounds the total context tokens of the batch (the Triton interpreter's
    cost); max_context_len bounds one sequence.
    """
    block_size = draw(block_sizes)
    head_dim = draw(head_dims)
    num_heads, num_kv_heads = draw(head_configs)
    num_seqs = draw(st.integers(1, max_seqs))
    context_lens, budget = [], max_tokens
    for _ in range(num_seqs):
        if budget < 1:
            break
        n = draw(_context_len(block_size, min(max_context_len, budget)))
        context_lens.append(n)
        budget -= n
    if decode:
        query_lens = [1] * len(context_lens)
    else:
        query_lens = [draw(st.one_of(st.just(n), st.just(1), st.integers(1, n)))
                      for n in context_lens]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    keys = [rng.standard_normal((n, num_kv_heads, head_dim)).astype(np.float32)
            for n in context_lens]
    values = [rng.standard_normal((n, num_kv_heads, head_dim)).astype(np.float32)
              for n in context_lens]
    key_cache, value_cache, block_tables = layout_paged(
        keys, values, block_size, rng, spare_blocks=draw(st.integers(0, 3)),
        pad_columns=draw(st.integers(0, 2)))
    slots = []
    for s, (n, q) in enumerate(zip(context_lens, query_lens)):
        t = np.arange(n - q, n)
        slots.append(block_tables[s, t // block_size].astype(np.int64) * block_size
                     + t % block_size)
    query_start_loc = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    num_tokens = int(query_start_loc[-1])
    return PagedAttentionCase(
        query=rng.standard_normal((num_tokens, num_heads, head_dim)).astype(np.float32),
        key=np.concatenate([k[n - q:] for k, n, q in zip(keys, context_lens, query_lens)]),
        value=np.concatenate([v[n - q:] for v, n, q in zip(values, context_lens, query_lens)]),
        key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
        context_lens=np.asarray(context_lens, dtype=np.int32),
        query_start_loc=query_start_loc, slot_mapping=np.concatenate(slots),
        keys=keys, values=values, scale=float(head_dim) ** -0.5)


def paged_decode_cases(**kwargs) -> st.SearchStrategy[PagedAttentionCase]:
    """`paged_attention_cases` with one new token per sequence."""
    return paged_attention_cases(decode=True, **kwargs)


@dataclass
class CacheWriteCase:
    """reshape_and_cache input: new K/V, caches (NaN-filled), distinct slots, some -1."""

    key: np.ndarray              # [num_tokens, num_kv_heads, head_dim] float32
    value: np.ndarray
    key_cache: np.ndarray        # [num_blocks, block_size, num_kv_heads, head_dim] all NaN
    value_cache: np.ndarray
    slot_mapping: np.ndarray     # [num_tokens] int64; distinct slots, -1 = skip


@st.composite
def cache_write_cases(draw, max_blocks: int = 8, block_sizes=kernel_block_sizes,
                      head_dims=kernel_head_dims,
                      head_configs=kernel_head_configs) -> CacheWriteCase:
    block_size = draw(block_sizes)
    head_dim = draw(head_dims)
    num_kv_heads = draw(head_configs)[1]
    num_blocks = draw(st.integers(1, max_blocks))
    num_slots = num_blocks * block_size
    slots = draw(st.lists(st.integers(0, num_slots - 1), min_size=1,
                          max_size=min(num_slots, 64), unique=True))
    slots = [s if keep else -1 for s, keep in
             zip(slots, draw(st.lists(st.booleans(), min_size=len(slots),
                                      max_size=len(slots))))]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (len(slots), num_kv_heads, head_dim)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return CacheWriteCase(
        key=rng.standard_normal(shape).astype(np.float32),
        value=rng.standard_normal(shape).astype(np.float32),
        key_cache=np.full(cache_shape, np.nan, dtype=np.float32),
        value_cache=np.full(cache_shape, np.nan, dtype=np.float32),
        slot_mapping=np.asarray(slots, dtype=np.int64))


@dataclass
class BlockCopyCase:
    """copy_blocks / swap_blocks input: random caches and (src, dst) block pairs.

    Destinations are distinct and never a source, so the result does not depend on the
    order the pairs are applied in. For copy_blocks both ids index `key_cache`; for
    swap_blocks src indexes `key_cache` and dst indexes `dst_cache`.
    """

    key_cache: np.ndarray        # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: np.ndarray
    dst_cache: np.ndarray        # [num_dst_blocks, block_size, num_kv_heads, head_dim]
    copy_pairs: list[tuple[int, int]]
    swap_pairs: list[tuple[int, int]]


@st.composite
def block_copy_cases(draw, max_blocks: int = 10, block_sizes=kernel_block_sizes,
                     head_dims=kernel_head_dims) -> BlockCopyCase:
    block_size = draw(block_sizes)
    head_dim = draw(head_dims)
    num_kv_heads = draw(st.sampled_from([1, 2, 3]))
    num_blocks = draw(st.integers(2, max_blocks))
    num_dst_blocks = draw(st.integers(1, max_blocks))
    ids = draw(st.permutations(range(num_blocks)))
    num_dst = draw(st.integers(1, num_blocks - 1))
    dsts, srcs = ids[:num_dst], ids[num_dst:]
    copy_pairs = [(draw(st.sampled_from(srcs)), d) for d in dsts]
    swap_dsts = draw(st.lists(st.integers(0, num_dst_blocks - 1), min_size=1,
                              max_size=num_dst_blocks, unique=True))
    swap_pairs = [(draw(st.integers(0, num_blocks - 1)), d) for d in swap_dsts]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return BlockCopyCase(
        key_cache=rng.standard_normal(shape).astype(np.float32),
        value_cache=rng.standard_normal(shape).astype(np.float32),
        dst_cache=rng.standard_normal((num_dst_blocks,) + shape[1:]).astype(np.float32),
        copy_pairs=copy_pairs, swap_pairs=swap_pairs)


@st.composite
def padded_block_tables(draw, max_seqs: int = 6, max_context_len: int = 100,
                        block_sizes=kernel_block_sizes,
                        ) -> tuple[np.ndarray, np.ndarray, int]:
    """(block_tables [S, max_blocks] int32, context_lens [S] int32, block_size).

    Contexts may be 0 (no pages); the padding past each row's pages is random block ids,
    not 0, so that a converter that reads it is caught.
    """
    block_size = draw(block_sizes)
    context_lens = draw(st.lists(st.one_of(st.just(0), _context_len(block_size, max_context_len)),
                                 min_size=1, max_size=max_seqs))
    pages = [-(-n // block_size) for n in context_lens]
    width = max(pages) + draw(st.integers(0, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    block_tables = rng.integers(0, 4 * width * len(pages) + 1, size=(len(pages), width))
    return (block_tables.astype(np.int32), np.asarray(context_lens, dtype=np.int32),
            block_size)



# Weight matrices as a Q4_1 file stores them: gguf's own quantizer and dequantizer on
# random rows, so the float32 values are fl(fl(d q) + m) as a loaded model's are. Shapes
# are whole 32 x 32 tiles; the scale spans small and large weights, and some rows are
# constant (d = 0) or hold exact zeros.
@st.composite
def q4_1_matrices(draw, max_panels: int = 3, max_blocks: int = 4) -> np.ndarray:
    import gguf
    n, k = 32 * draw(st.integers(1, max_panels)), 32 * draw(st.integers(1, max_blocks))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-3, 0.02, 1.0, 300.0]))
    w = (rng.standard_normal((n, k)) * scale + draw(st.sampled_from([0.0, scale]))
         ).astype(np.float32)
    w[rng.random(n) < 0.1] = np.float32(scale)                 # constant rows: d = 0
    w[rng.random((n, k)) < 0.05] = 0.0
    kind = gguf.GGMLQuantizationType.Q4_1
    return gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind).reshape(n, k)


# The greedy screen (models/greedy_head.py): hidden rows against an LM head, at sizes
# that are and are not multiples of the C code's 16 lanes, and weights at several
# scales. `near` copies of the best row of the first hidden state, scaled by 1 + j 2^-12,
# make logits that bf16 (8 bits) cannot tell apart but float32 (24 bits) can.
@dataclass
class ScreenCase:
    hidden: torch.Tensor      # [rows, k] float32
    weight: torch.Tensor      # [vocab, k] float32


@st.composite
def screen_cases(draw, max_rows: int = 5) -> ScreenCase:
    rows, k = draw(st.integers(1, max_rows)), draw(st.sampled_from([8, 16, 40, 64]))
    vocab = draw(st.sampled_from([1, 15, 16, 33, 100]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 30.0]))
    hidden = torch.randn(rows, k, generator=g) * scale
    weight = torch.randn(vocab, k, generator=g) * draw(st.sampled_from([0.02, 1.0]))
    near = draw(st.integers(0, min(4, vocab - 1)))
    if near:
        best = int((hidden[0] @ weight.T).argmax())
        for j in range(near):
            victim = (best + 1 + j) % vocab
            weight[victim] = weight[best] * (1 + (j + 1) * 2.0**-12)
    return ScreenCase(hidden, weight)


# ---------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------

# Sampler: small vocabularies, and logits that are distinct multiples of 1/16, so no two
# tokens tie (a tie makes the argmax and the top-k / top-p boundary ambiguous).
sampler_vocab_sizes = st.integers(min_value=2, max_value=40)


@st.composite
def distinct_logits(draw, vocab_size=None):
    """A list of `vocab_size` (drawn if None) pairwise distinct logits in [-16, 16]."""
    n = draw(sampler_vocab_sizes) if vocab_size is None else vocab_size
    ints = draw(st.lists(st.integers(-256, 256), min_size=n, max_size=n, unique=True))
    return [i / 16 for i in ints]


temperatures = st.sampled_from([0.25, 0.5, 1.0, 1.7])


# Engine workloads: ragged prompts arriving between steps, with random output lengths.
# Prompts start from a few shared stems so prefix-cache hits happen on their own.
@dataclass
class WorkloadRequest:
    request_id: str
    prompt: list[int]
    max_tokens: int
    arrival_step: int


@st.composite
def engine_workloads(draw, max_requests: int = 8, vocab: int = 64, max_prompt: int = 40,
                     max_tokens: int = 24) -> list[WorkloadRequest]:
    stems = [list(range(s, s + 16)) for s in (0, 20)]
    n = draw(st.integers(1, max_requests))
    requests, step = [], 0
    for i in range(n):
        stem = draw(st.sampled_from([[], *stems]))
        tail = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=max_prompt))
        step += draw(st.integers(0, 3))
        requests.append(WorkloadRequest(f"r{i}", (stem + tail)[:max_prompt],
                                        draw(st.integers(1, max_tokens)), step))
    return requests


# ---------------------------------------------------------------------------------------
# Models and tokenizer
# ---------------------------------------------------------------------------------------
# Unicode text short enough to stream token by token through the real tokenizer. No lone
# surrogates (not UTF-8 encodable), no control characters and nothing above U+3FFFF:
# SmolLM2's byte-level vocabulary has no token for some bytes (0xF1-0xFF lead bytes, a
# few control bytes), so such characters are dropped by the tokenizer itself.
unicode_texts = st.text(alphabet=st.characters(max_codepoint=0x3FFFF,
                                               exclude_categories=("Cs", "Cc")),
                        max_size=30)
