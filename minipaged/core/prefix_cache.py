"""Automatic prefix caching: full blocks found again by content (vLLM's follow-up to
paper section 4.4, "shared prefix", Fig. 10).

Section 4.4 shares the KV blocks of a prefix that the *user* declares shared. vLLM later
made it automatic: every full, computed block is registered under a chain hash of its
content, ``hash_block(parent_hash, token_ids)``, so a new prompt that begins with the
same tokens finds the blocks and skips their computation. A block that no sequence uses
any more is not forgotten: it stays here, *evictable*, until an allocation needs its
memory and evicts the least recently used one (an OrderedDict: O(1) evict and revive).

A hash only *finds* a candidate; a hit is *confirmed* exactly, so a hash collision can
never hand out the wrong K/V:

- the candidate's token ids must equal the block's token ids, and
- its parent (the block of the previous ``block_size`` tokens, or None for the first
  block) must be the very block the caller just hit. K/V depend on every earlier token,
  so equal tokens after a different past are a different block; comparing parents makes
  the confirmation cover the whole prefix, one block at a time.

Invariant to keep in mind: an entry is reachable only through its live parent. When a
block is evicted, all its descendants are dropped from the cache at once (they stay in
the evictor as plain reusable blocks), so a block id that is reused later can never make
an old child reachable again. And no two entries hold the same tokens after the same
parent: a second copy computed meanwhile is replaced by the cached one (`insert_blocks`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from minipaged.core.block_allocator import BlockAllocator, NoFreeBlocksError


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Chain hash of a full block: it stands for the whole prefix up to this block."""
    return hash((parent_hash, tuple(token_ids)))


@dataclass(slots=True)
class _Entry:
    block_hash: int
    block: int
    token_ids: tuple[int, ...]
    parent: int | None          # block id of the previous block of the chain


class PrefixCache:
    """Content-addressed full blocks, and an LRU evictor of those no sequence uses."""

    def __init__(self, hash_fn: Callable[[int | None, Sequence[int]], int] = hash_block) -> None:
        self.hash_fn = hash_fn   # a test passes a colliding one to prove the exact checks
        self._buckets: dict[int, list[_Entry]] = {}   # hash -> entries (> 1 on collisions)
        self._entries: dict[int, _Entry] = {}          # block -> its live entry
        self._children: dict[int, set[int]] = {}       # block -> blocks whose parent it is
        self._evictor: OrderedDict[int, None] = OrderedDict()   # oldest first
        self.num_queries = 0   # lookup() calls (one per block asked about)
        self.num_hits = 0

    # ---- finding blocks ------------------------------------------------------------------
    def lookup(self, block_hash: int, token_ids: Sequence[int],
               parent: int | None = None) -> int | None:
        """The cached block holding these tokens after `parent`, or None (counted)."""
        self.num_queries += 1
        block = self.peek(block_hash, token_ids, parent)
        self.num_hits += block is not None
        return block

    def peek(self, block_hash: int, token_ids: Sequence[int],
             parent: int | None = None) -> int | None:
        """`lookup` without counting (for "could this be admitted?" questions)."""
        entry = self._find(block_hash, tuple(token_ids), parent)
        return None if entry is None else entry.block

    def insert(self, block_hash: int, block: int, token_ids: Sequence[int],
               parent: int | None = None) -> int | None:
        """Register a full block whose K/V are computed; `parent` is the block before it
        in the same sequence (None for the first block). Returns the block that holds
        this content in the cache now: `block`; or an equal block cached earlier (the
        same tokens after the same parent), which the caller should share instead; or
        None if `parent` is not cached (then this block could never be reached)."""
        if block in self._evictor:
            raise ValueError(f"block {block} is evictable (unused): only blocks in use can "
                             "be inserted")
        if block in self._entries:
            return block
        if parent is not None and parent not in self._entries:
            return None
        tokens = tuple(token_ids)
        twin = self._find(block_hash, tokens, parent)
        if twin is not None:
            return twin.block
        entry = _Entry(block_hash, block, tokens, parent)
        self._buckets.setdefault(block_hash, []).append(entry)
        self._entries[block] = entry
        if parent is not None:
            self._children.setdefault(parent, set()).add(block)
        return block

    def _find(self, block_hash: int, tokens: tuple[int, ...], parent: int | None) -> _Entry | None:
        for entry in self._buckets.get(block_hash, ()):   # more than one only on collisions
            if entry.token_ids == tokens and entry.parent == parent:
                return entry
        return None

    # ---- whole sequences -----------------------------------------------------------------
    def match(self, token_ids: Sequence[int], block_size: int,
              count: bool = True) -> tuple[list[int], list[int]]:
        """The leading full blocks of a prompt found in the cache, and their chain hashes.
        Only blocks entirely before the last token may hit: that token is always
        computed, since the model needs its logits to sample the next one."""
        find = self.lookup if count else self.peek
        blocks: list[int] = []
        hashes: list[int] = []
        for i in range((len(token_ids) - 1) // block_size):
            chunk = token_ids[i * block_size:(i + 1) * block_size]
            block_hash = self.hash_fn(hashes[-1] if hashes else None, chunk)
            block = find(block_hash, chunk, blocks[-1] if blocks else None)
            if block is None:   # every later chain hash depends on this block: stop
                break
            blocks.append(block)
            hashes.append(block_hash)
        return blocks, hashes

    def insert_blocks(self, allocator: BlockAllocator, blocks: list[int], hashes: list[int],
                      token_ids: Sequence[int], block_size: int, num_full: int,
                      start: int | None = None) -> None:
        """Insert full blocks ``start .. num_full - 1`` of one sequence's table `blocks`
        (default start: ``len(hashes)``), extending `hashes`, its chain hashes, in place.
        A block whose twin is cached already (two requests computed the same prefix at
        once) is replaced in `blocks` by the twin and released: one copy is kept, and
        the sequence's later blocks chain onto the cached one."""
        for i in range(len(hashes) if start is None else start, num_full):
            chunk = token_ids[i * block_size:(i + 1) * block_size]
            if i == len(hashes):
                hashes.append(self.hash_fn(hashes[-1] if hashes else None, chunk))
            cached = self.insert(hashes[i], blocks[i], chunk, blocks[i - 1] if i else None)
            if cached is not None and cached != blocks[i]:
                self.acquire_block(allocator, cached)
                self.release_block(allocator, blocks[i])
                blocks[i] = cached

    # ---- the evictor ---------------------------------------------------------------------
    def make_evictable(self, block: int) -> None:
        """No sequence uses this cached block any more: keep it, most recently used."""
        if block not in self._entries:
            raise ValueError(f"block {block} is not in the prefix cache")
        if block in self._evictor:
            raise ValueError(f"block {block} is already evictable")
        self._evictor[block] = None

    def revive(self, block: int) -> None:
        """A hit on an evictable block: a sequence uses it again, so it may not be evicted."""
        if block not in self._evictor or block not in self._entries:
            raise ValueError(f"block {block} is not an evictable cached block")
        del self._evictor[block]

    def evict(self) -> int:
        """Forget the least recently used evictable block and return it for reuse."""
        if not self._evictor:
            raise NoFreeBlocksError("no evictable block in the prefix cache")
        block, _ = self._evictor.popitem(last=False)
        if block in self._entries:   # not already dropped with an evicted ancestor
            self._drop_subtree(block)
        return block

    def _drop_subtree(self, block: int) -> None:
        stack = [block]
        while stack:
            entry = self._entries.pop(stack.pop())
            bucket = self._buckets[entry.block_hash]
            bucket.remove(entry)
            if not bucket:
                del self._buckets[entry.block_hash]
            siblings = self._children.get(entry.parent)
            if siblings is not None:
                siblings.discard(entry.block)
                if not siblings:
                    del self._children[entry.parent]
            stack.extend(self._children.pop(entry.block, ()))

    # ---- with the device pool ------------------------------------------------------------
    def take_block(self, allocator: BlockAllocator) -> int:
        """A never-cached free block first; else evict the least recently used one."""
        if allocator.num_free or not self._evictor:
            return allocator.allocate()   # raises NoFreeBlocksError when both are empty
        block = self.evict()
        allocator.incref(block)           # parked at refcount 0 -> in use
        return block

    def acquire_block(self, allocator: BlockAllocator, block: int) -> None:
        """A hit: one more reference, and an evictable block is in use again."""
        if block in self._evictor:
            self.revive(block)
        allocator.incref(block)

    def release_block(self, allocator: BlockAllocator, block: int) -> None:
        """Drop one reference. A cached block reaching 0 stays here, evictable (its K/V
        may serve a later hit); any other block goes back to the free list."""
        if block not in self._entries:
            allocator.free(block)
        elif allocator.decref(block) == 0:
            self.make_evictable(block)

    # ---- inspection ----------------------------------------------------------------------
    def __contains__(self, block: int) -> bool:
        """True if the block is a live cache entry (reachable by lookups)."""
        return block in self._entries

    def is_evictable(self, block: int) -> bool:
        return block in self._evictor

    def evictable_blocks(self) -> list[int]:
        """Evictable blocks, least recently used first."""
        return list(self._evictor)

    @property
    def num_evictable(self) -> int:
        return len(self._evictor)

    @property
    def num_cached(self) -> int:
        """Live entries, in use or evictable."""
        return len(self._entries)

    def __repr__(self) -> str:
        return f"PrefixCache(cached={self.num_cached}, evictable={self.num_evictable})"
