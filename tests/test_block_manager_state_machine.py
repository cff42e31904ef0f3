"""Random allocate / compute / append / fork / free / swap sequences through the block
manager, checked against a naive model that keeps each sequence's tokens contiguously.

The KV cache is simulated as NumPy arrays ``[num_blocks, block_size]`` (device and host)
and the machine plays the engine: it writes each computed token into its slot, and
applies the returned copy-on-write and swap pairs to the arrays exactly as the cache
engine will. Each slot holds two things: the token id, and a fingerprint of the whole
prefix up to it — what a real K/V vector depends on. So reading a sequence back through
its block table checks not only its tokens but that every prefix-cache hit had the same
*past*, which a colliding hash would get wrong if hits were confirmed by tokens alone.

Slots of blocks on the free list are poisoned after every step: whoever reads a block
that was freed (instead of recomputing it) reads garbage and fails.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from minipaged.core.block_allocator import NoFreeBlocksError
from minipaged.core.block_manager import AllocStatus, BlockManager
from minipaged.core.prefix_cache import hash_block
from tests.strategies import (
    MEMORY_CORE_STEPS,
    STATE_MACHINE_EXAMPLES,
    colliding_hash,
    tiny_block_sizes,
    tiny_prompts,
    tiny_token_ids,
    watermarks,
)

EMPTY = -1      # a slot never written
POISON = -2     # a slot of a block that went back to the free list
MAX_SEQS = 8


def fingerprints(tokens: np.ndarray, start: int = 0) -> np.ndarray:
    """fp[i] stands for tokens[0..i], as the K/V of token i depends on all of them."""
    fps, h = [], start
    for t in tokens.tolist():
        h = hash((h, t))
        fps.append(h)
    return np.array(fps, dtype=np.int64)


@dataclass
class SeqModel:
    tokens: np.ndarray     # the sequence, contiguous
    fps: np.ndarray        # prefix fingerprints, one per token
    computed: int          # tokens whose K/V the "engine" has written
    group: int


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PagedMemoryMachine(RuleBasedStateMachine):
    prefix_caching = False
    hash_fn = staticmethod(hash_block)

    @initialize(block_size=tiny_block_sizes, num_blocks=st.integers(1, 24),
                num_swap_blocks=st.integers(0, 16), watermark=watermarks)
    def setup(self, block_size, num_blocks, num_swap_blocks, watermark):
        self.bm = BlockManager(num_blocks, block_size, num_swap_blocks,
                               enable_prefix_caching=self.prefix_caching, watermark=watermark,
                               hash_fn=self.hash_fn)
        self.bs = block_size
        self.device = {k: np.full((num_blocks, block_size), EMPTY, np.int64) for k in "tf"}
        self.host = {k: np.full((num_swap_blocks, block_size), EMPTY, np.int64) for k in "tf"}
        self.seqs: dict[int, SeqModel] = {}
        self.groups: dict[int, list[int]] = {}
        self.swapped: set[int] = set()
        self.next_id = 0
        self.cow_copies = self.swapped_out = self.swapped_in = 0

    # ---- helpers -------------------------------------------------------------------------
    def _groups(self, *, swapped: bool, computed: bool | None = None) -> list[int]:
        out = []
        for gid, ids in self.groups.items():
            if (gid in self.swapped) != swapped:
                continue
            full = all(self.seqs[s].computed == len(self.seqs[s].tokens) for s in ids)
            if computed is None or computed == full:
                out.append(gid)
        return sorted(out)

    def _write(self, sid: int, start: int, end: int) -> None:
        """The engine computes tokens start..end-1: their K/V land in their slots."""
        seq, table = self.seqs[sid], self.bm.get_block_table(sid)
        for p in range(start, end):
            block, offset = table[p // self.bs], p % self.bs
            assert self.bm.device.refcount(block) >= 1
            self.device["t"][block, offset] = seq.tokens[p]
            self.device["f"][block, offset] = seq.fps[p]

    def _compute(self, ids: list[int], end: int) -> None:
        """Prefill up to `end` for a group whose sequences still share one table."""
        self._write(ids[0], self.seqs[ids[0]].computed, end)
        for sid in ids:
            self.bm.mark_computed(sid, end)
            self.seqs[sid].computed = end
        assert all(self.bm.get_block_table(s) == self.bm.get_block_table(ids[0]) for s in ids)

    def _snapshot(self):
        return (self.bm.num_free_blocks, self.bm.num_free_host_blocks,
                {s: self.bm.get_block_table(s) for s in self.seqs})

    def _min_hits(self, prompt: list[int]) -> int:
        """Every computed full block of a sequence on the device is cached, so a prompt
        that starts with those tokens must hit at least that many blocks."""
        best, limit = 0, (len(prompt) - 1) // self.bs
        for sid, seq in self.seqs.items():
            if seq.group in self.swapped:
                continue
            k = 0
            while (k < min(limit, seq.computed // self.bs)
                   and seq.tokens[k * self.bs:(k + 1) * self.bs].tolist()
                   == prompt[k * self.bs:(k + 1) * self.bs]):
                k += 1
            best = max(best, k)
        return best

    # ---- rules ---------------------------------------------------------------------------
    @precondition(lambda self: len(self.seqs) < MAX_SEQS)
    @rule(prompt=tiny_prompts, n=st.integers(1, 3), prefill=st.booleans())
    def allocate(self, prompt, n, prefill):
        """Admit a prompt for a group of n sequences; prefill=True computes it at once."""
        n = min(n, MAX_SEQS - len(self.seqs))
        status = self.bm.can_allocate(prompt, n)
        required = cdiv(len(prompt), self.bs)
        never = required > self.bm.num_blocks - self.bm.watermark_blocks
        assert (status is AllocStatus.NEVER) == never
        min_hits = self._min_hits(prompt) if self.prefix_caching else 0
        before = self._snapshot()
        ids = list(range(self.next_id, self.next_id + n))
        try:
            self.bm.allocate(ids, prompt)
        except NoFreeBlocksError:
            assert status is not AllocStatus.OK
            assert self._snapshot() == before   # all or nothing
            return
        self.next_id += n
        # what is left free is what can_allocate predicted: exactly the watermark test
        assert (status is AllocStatus.OK) == (self.bm.num_free_blocks >= self.bm.watermark_blocks)
        cached = self.bm.num_cached_tokens(ids[0])
        assert cached % self.bs == 0
        assert cached <= (len(prompt) - 1) // self.bs * self.bs   # last token recomputed
        assert cached >= min_hits * self.bs
        if not self.prefix_caching:
            assert cached == 0
        table = self.bm.get_block_table(ids[0])
        assert len(table) == required
        tokens = np.array(prompt, dtype=np.int64)
        for sid in ids:
            assert self.bm.get_block_table(sid) == table   # the group shares the prompt
            self.seqs[sid] = SeqModel(tokens.copy(), fingerprints(tokens), cached, ids[0])
        self.groups[ids[0]] = ids
        if prefill:
            self._compute(ids, len(prompt))

    @precondition(lambda self: self._groups(swapped=False, computed=False))
    @rule(data=st.data())
    def compute(self, data):
        """A (chunk of a) prefill: the group's sequences still share one table."""
        gid = data.draw(st.sampled_from(self._groups(swapped=False, computed=False)))
        ids = self.groups[gid]
        start = self.seqs[ids[0]].computed
        self._compute(ids, data.draw(st.integers(start + 1, len(self.seqs[ids[0]].tokens))))

    @precondition(lambda self: self._groups(swapped=False, computed=True))
    @rule(data=st.data(), k=st.integers(1, 4))
    def append(self, data, k):
        """A decode step of some of a group's sequences, each with its own new tokens."""
        gid = data.draw(st.sampled_from(self._groups(swapped=False, computed=True)))
        ids = data.draw(st.lists(st.sampled_from(self.groups[gid]), min_size=1, unique=True))
        can = self.bm.can_append_slots(ids, k)
        failed, appended = False, []
        for sid in ids:   # the scheduler reserves slots for the whole group first ...
            seq = self.seqs[sid]
            new = data.draw(st.lists(tiny_token_ids, min_size=k, max_size=k))
            old_table, old_len = self.bm.get_block_table(sid), len(seq.tokens)
            try:
                copies = self.bm.append_slots(sid, new)
            except NoFreeBlocksError:
                assert not can   # can_append_slots never lies
                assert self.bm.get_block_table(sid) == old_table
                failed = True
                break
            table = self.bm.get_block_table(sid)
            assert table[:len(old_table) - 1] == old_table[:-1]
            for src, dst in copies:   # copy-on-write: only the partly filled last block
                assert old_len % self.bs and src == old_table[-1]
                assert dst == table[len(old_table) - 1]
                for arr in self.device.values():
                    arr[dst] = arr[src]
            self.cow_copies += len(copies)
            seq.tokens = np.concatenate([seq.tokens, np.array(new, dtype=np.int64)])
            seq.fps = np.concatenate([seq.fps, fingerprints(seq.tokens[old_len:],
                                                            int(seq.fps[old_len - 1]))])
            appended.append((sid, old_len))
        assert failed == (not can)   # exact: a False answer means some append fails
        for sid, old_len in appended:   # ... then the forward writes their K/V ...
            table, end = self.bm.get_block_table(sid), len(self.seqs[sid].tokens)
            for p in range(old_len, end):   # never into a block someone else holds
                assert self.bm.device.refcount(table[p // self.bs]) == 1
            self._write(sid, old_len, end)
        for sid, _ in appended:   # ... and the engine marks them computed
            self.seqs[sid].computed = len(self.seqs[sid].tokens)
            self.bm.mark_computed(sid, self.seqs[sid].computed)

    @precondition(lambda self: len(self.seqs) < MAX_SEQS and any(
        s.computed == len(s.tokens) for s in self.seqs.values()))
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(
            s for s, m in self.seqs.items() if m.computed == len(m.tokens))))
        child, self.next_id = self.next_id, self.next_id + 1
        self.bm.fork(parent, child)
        p = self.seqs[parent]
        self.seqs[child] = SeqModel(p.tokens.copy(), p.fps.copy(), p.computed, p.group)
        self.groups[p.group].append(child)
        assert self.bm.get_block_table(child) == self.bm.get_block_table(parent)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(sid)
        gid = self.seqs.pop(sid).group
        self.groups[gid].remove(sid)
        if not self.groups[gid]:
            del self.groups[gid]
            self.swapped.discard(gid)
        assert not self.bm.has_seq(sid)

    @precondition(lambda self: self.groups)
    @rule(data=st.data())
    def swap(self, data):
        """Preempt a group to the host, or bring a swapped one back (one rule, so that
        swapping is not twice as frequent as the other operations)."""
        gid = data.draw(st.sampled_from(sorted(self.groups)))
        (self._swap_in if gid in self.swapped else self._swap_out)(gid)

    def _swap_out(self, gid: int) -> None:
        ids = self.groups[gid]
        old = {s: self.bm.get_block_table(s) for s in ids}
        if not self.bm.can_swap_out(ids):
            with pytest.raises(NoFreeBlocksError):
                self.bm.swap_out(ids)
            return
        pairs = self.bm.swap_out(ids)
        mapping = dict(pairs)
        assert len(mapping) == len(pairs) == len(set(mapping.values()))   # one host block each
        assert set(mapping) == {b for t in old.values() for b in t}
        for src, dst in pairs:
            for key in "tf":
                self.host[key][dst] = self.device[key][src]
        for s in ids:
            assert self.bm.get_block_table(s) == [mapping[b] for b in old[s]]
        self.swapped.add(gid)
        self.swapped_out += len(pairs)

    def _swap_in(self, gid: int) -> None:
        ids = self.groups[gid]
        can = self.bm.can_swap_in(ids)
        try:
            pairs = self.bm.swap_in(ids)
        except NoFreeBlocksError:
            assert not can
            return
        held = {b for s in ids for b in self.bm.get_block_table(s)}
        assert len({d for _, d in pairs}) == len(pairs) and {d for _, d in pairs} <= held
        for src, dst in pairs:
            for key in "tf":
                self.device[key][dst] = self.host[key][src]
        self.swapped.discard(gid)
        self.swapped_in += len(pairs)

    # ---- invariants ----------------------------------------------------------------------
    @invariant()
    def blocks_are_accounted_for(self):
        bm, cache = self.bm, self.bm.prefix_cache
        for pool in (bm.device, bm.host):
            assert pool.num_free + pool.num_used == pool.num_blocks
        on_device = Counter(b for s in self.seqs for b in bm.get_block_table(s)
                            if self.seqs[s].group not in self.swapped)
        on_host = Counter(b for s in self.seqs for b in bm.get_block_table(s)
                          if self.seqs[s].group in self.swapped)
        for b in range(bm.num_blocks):   # a refcount is the number of tables holding it
            assert bm.device.refcount(b) == on_device[b]
            if on_device[b] == 0:   # ... and an unused block is free or evictable, not both
                assert bm.device.is_free(b) != cache.is_evictable(b)
        for b in range(bm.host.num_blocks):
            assert bm.host.refcount(b) == on_host[b]
            assert bm.host.is_free(b) == (on_host[b] == 0)
        assert bm.device.num_free + cache.num_evictable + len(on_device) == bm.num_blocks
        assert bm.num_free_blocks == bm.device.num_free + cache.num_evictable
        assert bm.usage == len(on_device) / bm.num_blocks
        if not self.prefix_caching:
            assert cache.num_cached == 0 and bm.prefix_cache_hits == 0
        assert (bm.num_cow_copies, bm.num_swapped_out_blocks, bm.num_swapped_in_blocks) == (
            self.cow_copies, self.swapped_out, self.swapped_in)

    @invariant()
    def every_sequence_reads_back_its_tokens(self):
        for sid, seq in self.seqs.items():
            table = self.bm.get_block_table(sid)
            assert self.bm.get_token_ids(sid) == seq.tokens.tolist()
            assert len(table) == cdiv(len(seq.tokens), self.bs) and len(set(table)) == len(table)
            cache = self.host if seq.group in self.swapped else self.device
            p = np.arange(seq.computed)
            blocks, offsets = np.array(table, dtype=np.int64)[p // self.bs], p % self.bs
            assert np.array_equal(cache["t"][blocks, offsets], seq.tokens[:seq.computed])
            assert np.array_equal(cache["f"][blocks, offsets], seq.fps[:seq.computed])
            if self.prefix_caching and seq.group not in self.swapped:
                for b in table[:seq.computed // self.bs]:   # computed full blocks are cached
                    assert b in self.bm.prefix_cache

    @invariant()
    def poison_free_blocks(self):
        """Not a check: what a freed block held is garbage from now on."""
        cache = self.bm.prefix_cache
        for b in range(self.bm.num_blocks):
            if self.bm.device.is_free(b) or (cache.is_evictable(b) and b not in cache):
                self.device["t"][b] = self.device["f"][b] = POISON
        for b in range(self.bm.host.num_blocks):
            if self.bm.host.is_free(b):
                self.host["t"][b] = self.host["f"][b] = POISON

    def teardown(self):
        """Freeing everything returns every block, on both pools."""
        if not hasattr(self, "bm") or sys.exc_info()[0] is not None:
            return   # not after a failed step: its error is the one to report
        for sid in list(self.seqs):
            self.bm.free(sid)
        assert self.bm.num_free_blocks == self.bm.num_blocks and self.bm.usage == 0
        assert self.bm.num_free_host_blocks == self.bm.host.num_blocks


class PrefixCachingMachine(PagedMemoryMachine):
    prefix_caching = True


class CollidingHashMachine(PagedMemoryMachine):
    """Chain hashes with 3 values: hits are only right if confirmed exactly."""
    prefix_caching = True
    hash_fn = staticmethod(colliding_hash)


TestPagedMemory = PagedMemoryMachine.TestCase
TestPagedMemoryWithPrefixCaching = PrefixCachingMachine.TestCase
TestPagedMemoryWithACollidingHash = CollidingHashMachine.TestCase
for _case in (TestPagedMemory, TestPagedMemoryWithPrefixCaching,
              TestPagedMemoryWithACollidingHash):
    _case.settings = settings(max_examples=STATE_MACHINE_EXAMPLES,
                              stateful_step_count=MEMORY_CORE_STEPS)
del _case
