"""The block manager: every sequence's block table over the device and host pools
(paper sections 4.2-4.5; names follow vLLM's v0 block manager).

- 4.2 KV cache manager: a prompt gets ``ceil(len / block_size)`` blocks (`allocate`).
- 4.3 decoding: a new block only when the last one is full (`append_slots`).
- 4.4 sharing: `fork` and a group `allocate` share blocks by reference count; the first
  write to a shared, partly filled last block copies it (copy-on-write). With
  ``enable_prefix_caching`` a prompt also reuses computed full blocks of earlier
  requests (vLLM's automatic prefix caching, `prefix_cache.py`).
- 4.5 swapping: a preempted group's blocks move to the host pool and back.

Nothing here touches a tensor: operations return ``(src, dst)`` block pairs, which the
cache engine applies in the order swap-out, swap-in, copies within one step.

Invariant to keep in mind: a device block's refcount is the number of block tables
holding it; at 0 it is on the free list or, if it is a cached prefix block, evictable.
So free + evictable + held = num_blocks, and freeing every sequence returns every block.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from minipaged.core.block_allocator import BlockAllocator, NoFreeBlocksError
from minipaged.core.block_table import BlockTable, distinct_blocks, remap
from minipaged.core.prefix_cache import PrefixCache, hash_block


class AllocStatus(enum.Enum):
    OK = enum.auto()      # allocate now
    LATER = enum.auto()   # not enough free blocks now (watermark included): wait
    NEVER = enum.auto()   # the prompt is larger than the device can ever give


@dataclass
class _Seq:
    table: BlockTable
    token_ids: list[int]
    num_cached_tokens: int = 0      # prompt tokens served by the prefix cache
    num_computed_tokens: int = 0    # tokens whose K/V the engine has written
    block_hashes: list[int] = field(default_factory=list)   # chain hashes, full blocks
    swapped: bool = False           # the table holds host blocks


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """The block tables of all sequences, over a device pool and a host (swap) pool."""

    def __init__(self, num_blocks: int, block_size: int, num_swap_blocks: int = 0,
                 enable_prefix_caching: bool = False, watermark: float = 0.01, *,
                 hash_fn: Callable[[int | None, Sequence[int]], int] = hash_block) -> None:
        for name, value, low in (("block_size", block_size, 1), ("num_blocks", num_blocks, 1),
                                 ("num_swap_blocks", num_swap_blocks, 0)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value!r}")
        if not 0 <= watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {watermark!r}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.watermark_blocks = int(watermark * num_blocks)
        self.device = BlockAllocator(num_blocks, "device")
        self.host = BlockAllocator(num_swap_blocks, "host")
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_cache = PrefixCache(hash_fn)   # with caching off, it just stays empty
        self._seqs: dict[Hashable, _Seq] = {}
        self.num_cow_copies = 0
        self.num_swapped_out_blocks = 0
        self.num_swapped_in_blocks = 0
        self.prefix_cache_queries = 0   # full prompt blocks that could have been hits
        self.prefix_cache_hits = 0      # ... and were

    def can_allocate(self, token_ids: Sequence[int], num_seqs: int = 1, *,
                     use_cache: bool = True) -> AllocStatus:
        """Can a prompt be admitted, leaving the watermark free for running sequences to
        grow? A group's `num_seqs` sequences share the prompt's blocks: no extra need."""
        if len(token_ids) == 0:
            raise ValueError("token_ids must not be empty")
        if num_seqs < 1:
            raise ValueError(f"num_seqs must be >= 1, got {num_seqs!r}")
        required = _cdiv(len(token_ids), self.block_size)
        if required > self.num_blocks - self.watermark_blocks:
            return AllocStatus.NEVER
        hits = self._match_prefix(token_ids, count=False, use_cache=use_cache)[0]
        ok = self._free_after(hits, required) >= self.watermark_blocks
        return AllocStatus.OK if ok else AllocStatus.LATER

    def allocate(self, seq_ids: Sequence[Hashable], token_ids: Sequence[int], *,
                 use_cache: bool = True) -> None:
        """Give a prompt its blocks, shared by all `seq_ids` (refcount = len(seq_ids)).
        use_cache=False (here and in can_allocate): no prefix-cache hits for this prompt."""
        if len(token_ids) == 0:
            raise ValueError("token_ids must not be empty")
        seq_ids = self._as_list(seq_ids, new=True)
        tokens = list(token_ids)
        required = _cdiv(len(tokens), self.block_size)
        hits, hashes = self._match_prefix(tokens, count=True, use_cache=use_cache)
        if self._free_after(hits, required) < 0:
            raise NoFreeBlocksError(f"{required} blocks needed, {self.num_free_blocks} free")
        if self.enable_prefix_caching and use_cache:
            self.prefix_cache_queries += (len(tokens) - 1) // self.block_size
            self.prefix_cache_hits += len(hits)
        for block in hits:   # take the hits first: the evictions below must not take them
            self.prefix_cache.acquire_block(self.device, block)
        blocks = hits + [self._take_block() for _ in range(required - len(hits))]
        for block in blocks * (len(seq_ids) - 1):   # one more reference per extra sharer
            self.device.incref(block)
        cached = len(hits) * self.block_size
        for seq_id in seq_ids:
            self._seqs[seq_id] = _Seq(BlockTable(self.block_size, blocks, len(tokens)),
                                      tokens[:], cached, cached, hashes[:])

    def num_cached_tokens(self, seq_id: Hashable) -> int:
        return self._get(seq_id).num_cached_tokens

    def mark_computed(self, seq_id: Hashable, num_tokens: int) -> None:
        """The first `num_tokens` tokens now have K/V in the cache: only now may their full
        blocks become prefix-cache entries (a reserved block may still hold garbage). A
        block whose twin is cached already is replaced by it: read tables after this."""
        seq = self._get(seq_id, swapped=False)
        if not 0 <= num_tokens <= len(seq.token_ids):
            raise ValueError(f"num_tokens must be in [0, {len(seq.token_ids)}], got {num_tokens}")
        seq.num_computed_tokens = max(seq.num_computed_tokens, num_tokens)
        self._register(seq)

    def can_append_slots(self, seq_ids: Sequence[Hashable], num_new_tokens: int = 1) -> bool:
        """Exactly: can each of these seqs, in turn, append `num_new_tokens` tokens?"""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens!r}")
        seqs = self._group(seq_ids, swapped=False)
        return self._blocks_to_append(seqs, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq_id: Hashable, token_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Reserve slots for new tokens; returns the copy-on-write copies (src, dst)."""
        seq = self._get(seq_id, swapped=False)
        new = list(token_ids)
        if self._blocks_to_append([seq], len(new)) > self.num_free_blocks:
            raise NoFreeBlocksError(f"no free block to append to seq_id {seq_id!r}")
        table, copies = seq.table, []
        if new and self._is_shared_partial(table):
            src, dst = table.blocks[-1], self._take_block()
            self._release(src)   # the others still hold it
            table.blocks[-1] = dst
            copies.append((src, dst))
            self.num_cow_copies += 1
        needed = _cdiv(table.num_tokens + len(new), self.block_size) - table.num_blocks
        table.blocks += [self._take_block() for _ in range(needed)]
        table.num_tokens += len(new)
        seq.token_ids += new
        return copies

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child shares every block of the parent (refcount + 1) until it writes."""
        parent = self._get(parent_id)
        self._as_list([child_id], new=True)
        pool = self.host if parent.swapped else self.device
        for block in parent.table.blocks:
            pool.incref(block)
        self._seqs[child_id] = replace(parent, table=parent.table.copy(),
                                       token_ids=parent.token_ids[:],
                                       block_hashes=parent.block_hashes[:])

    def free(self, seq_id: Hashable) -> None:
        """Drop the sequence; its blocks (device or host) lose one reference each."""
        seq = self._get(seq_id)
        del self._seqs[seq_id]
        # deepest block first: the LRU evictor then drops a prefix's tail before its head
        for block in reversed(seq.table.blocks):
            (self.host.free if seq.swapped else self._release)(block)

    def can_swap_out(self, seq_ids: Sequence[Hashable]) -> bool:
        seqs = self._group(seq_ids, swapped=False)
        return len(distinct_blocks(s.table for s in seqs)) <= self.host.num_free

    def swap_out(self, seq_ids: Sequence[Hashable]) -> list[tuple[int, int]]:
        """Move a group to the host; a block shared within it becomes ONE host block.
        Returns the ``(device_block, host_block)`` pairs to copy."""
        if not self.can_swap_out(seq_ids):
            raise NoFreeBlocksError("not enough free host blocks to swap out")
        seqs = self._group(seq_ids, swapped=False)
        pairs = remap([s.table for s in seqs], self.host.allocate, self.host.incref, self._release)
        for seq in seqs:
            seq.swapped = True
        self.num_swapped_out_blocks += len(pairs)
        return pairs

    def can_swap_in(self, seq_ids: Sequence[Hashable]) -> bool:
        """Room for the group's blocks and a new block per sequence (its next token),
        keeping the watermark free unless no sequence is on the device (it protects nobody)."""
        seqs = self._group(seq_ids, swapped=True)
        needed = len(distinct_blocks(s.table for s in seqs)) + len(seqs)
        reserve = 0 if all(s.swapped for s in self._seqs.values()) else self.watermark_blocks
        return self.num_free_blocks - needed >= reserve

    def swap_in(self, seq_ids: Sequence[Hashable]) -> list[tuple[int, int]]:
        """Bring a swapped group back; returns the ``(host_block, device_block)`` pairs."""
        seqs = self._group(seq_ids, swapped=True)
        if len(distinct_blocks(s.table for s in seqs)) > self.num_free_blocks:
            raise NoFreeBlocksError("not enough free device blocks to swap in")
        pairs = remap([s.table for s in seqs], self._take_block, self.device.incref, self.host.free)
        for seq in seqs:   # computed full blocks are cacheable again (or found still cached)
            seq.swapped = False
            self._register(seq, start=0)
        held = set(distinct_blocks(s.table for s in seqs))
        pairs = [(h, d) for h, d in pairs if d in held]   # no copy into a replaced block
        self.num_swapped_in_blocks += len(pairs)
        return pairs

    def has_seq(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def seq_ids(self) -> list[Hashable]:
        return list(self._seqs)

    def is_swapped(self, seq_id: Hashable) -> bool:
        return self._get(seq_id).swapped

    def get_block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._get(seq_id).table.blocks)

    def get_token_ids(self, seq_id: Hashable) -> list[int]:
        return list(self._get(seq_id).token_ids)

    @property
    def num_free_blocks(self) -> int:
        """Device blocks an allocation can take: free ones plus evictable cached ones."""
        return self.device.num_free + self.prefix_cache.num_evictable

    @property
    def num_free_host_blocks(self) -> int:
        return self.host.num_free

    @property
    def usage(self) -> float:
        """Fraction of device blocks held by sequences."""
        return (self.num_blocks - self.num_free_blocks) / self.num_blocks

    def _match_prefix(self, tokens: Sequence[int], count: bool, use_cache: bool) -> tuple:
        on = self.enable_prefix_caching and use_cache      # (hits, their chain hashes)
        return self.prefix_cache.match(tokens, self.block_size, count) if on else ([], [])

    def _free_after(self, hits: list[int], required: int) -> int:   # once the prompt is in
        revived = sum(self.prefix_cache.is_evictable(b) for b in hits)
        return self.num_free_blocks - revived - (required - len(hits))

    def _register(self, seq: _Seq, start: int | None = None) -> None:
        if self.enable_prefix_caching:
            self.prefix_cache.insert_blocks(self.device, seq.table.blocks, seq.block_hashes,
                                            seq.token_ids, self.block_size,
                                            seq.num_computed_tokens // self.block_size, start)

    def _blocks_to_append(self, seqs: list[_Seq], k: int) -> int:
        needed, sharers = 0, Counter()
        for seq in seqs:
            table = seq.table
            needed += _cdiv(table.num_tokens + k, self.block_size) - table.num_blocks
            if k and self._is_shared_partial(table):
                sharers[table.blocks[-1]] += 1
        # of the r holders of a shared partial block, r - 1 copy it; the last writes in place
        return needed + sum(min(m, self.device.refcount(b) - 1) for b, m in sharers.items())

    def _is_shared_partial(self, table: BlockTable) -> bool:   # the next write must copy
        last = table.blocks[-1]
        return table.num_tokens % self.block_size > 0 and self.device.refcount(last) > 1

    def _take_block(self) -> int:
        return self.prefix_cache.take_block(self.device)

    def _release(self, block: int) -> None:
        self.prefix_cache.release_block(self.device, block)

    def _get(self, seq_id: Hashable, swapped: bool | None = None) -> _Seq:
        try:
            seq = self._seqs[seq_id]
        except (KeyError, TypeError):
            raise ValueError(f"unknown seq_id {seq_id!r}") from None
        if swapped is not None and seq.swapped != swapped:
            where = "swapped out" if seq.swapped else "on the device"
            raise ValueError(f"seq_id {seq_id!r} is {where}")
        return seq

    def _group(self, seq_ids: Iterable[Hashable], swapped: bool) -> list[_Seq]:
        return [self._get(seq_id, swapped) for seq_id in self._as_list(seq_ids)]

    def _as_list(self, seq_ids: Iterable[Hashable], new: bool = False) -> list[Hashable]:
        if isinstance(seq_ids, (str, bytes)) or not isinstance(seq_ids, Iterable):
            raise ValueError(f"seq_ids must be a list of sequence ids, got {seq_ids!r}")
        ids = list(seq_ids)
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids must be non-empty and distinct, got {ids!r}")
        for seq_id in ids if new else ():
            if seq_id in self._seqs:
                raise ValueError(f"seq_id {seq_id!r} is already allocated")
        return ids

