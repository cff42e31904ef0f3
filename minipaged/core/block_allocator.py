"""Physical KV blocks: a free list and reference counts (paper section 4.2, and 4.4).

The KV cache manager of section 4.2 splits the KV memory into equal blocks and hands
them out one at a time, on demand; section 4.4 adds a reference count per block so that
several sequences can map the same physical block (shared prompts, parallel samples,
beam candidates). The device pool and the host pool of section 4.5 (swap space) are two
instances of this one class.

Invariant to keep in mind: every block is in exactly one of three states —

- free: on the free list, refcount 0;
- held: refcount > 0 (that many block-table entries point at it);
- parked: refcount 0 but *not* on the free list, because someone else keeps it. The
  prefix cache parks blocks that no sequence uses but whose KV data is worth keeping
  (`decref` parks, `incref` brings a parked block back into use).

so ``num_free + num_used == num_blocks`` always, and every operation is O(1).
"""

from __future__ import annotations


class NoFreeBlocksError(RuntimeError):
    """The pool has no free block left (the scheduler should have asked `can_*` first)."""


class BlockAllocator:
    """A pool of ``num_blocks`` physical blocks with ids ``0 .. num_blocks - 1``."""

    def __init__(self, num_blocks: int, name: str = "device") -> None:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks!r}")
        self.name = name
        self.num_blocks = num_blocks = int(num_blocks)
        self._refcounts = [0] * num_blocks
        self._on_free_list = [True] * num_blocks
        # LIFO: a just-freed block is reused first (it is likely still warm in caches).
        # Reversed so that a fresh pool hands out 0, 1, 2, ... (easier to read in tests).
        self._free = list(range(num_blocks - 1, -1, -1))

    # ---- the four operations -------------------------------------------------------------
    def allocate(self) -> int:
        """Take a free block; its refcount becomes 1."""
        if not self._free:
            raise NoFreeBlocksError(f"no free {self.name} block (all {self.num_blocks} in use)")
        block = self._free.pop()
        self._on_free_list[block] = False
        self._refcounts[block] = 1
        return block

    def free(self, block: int) -> None:
        """Drop one reference; at refcount 0 the block goes back to the free list."""
        if self.decref(block) == 0:
            self._on_free_list[block] = True
            self._free.append(block)

    def incref(self, block: int) -> None:
        """Add one reference to a held block, or bring a parked block back into use."""
        self._check(block)
        if self._on_free_list[block]:
            raise ValueError(f"block {block} is free in the {self.name} pool: allocate it "
                             "instead of incref")
        self._refcounts[block] += 1

    def decref(self, block: int) -> int:
        """Drop one reference and return the new count. Unlike `free`, a block reaching
        0 stays off the free list (parked): the caller keeps it, e.g. the prefix cache."""
        self._check(block)
        if self._refcounts[block] == 0:
            raise ValueError(f"block {block} of the {self.name} pool has refcount 0: "
                             "double free")
        self._refcounts[block] -= 1
        return self._refcounts[block]

    # ---- inspection ----------------------------------------------------------------------
    def refcount(self, block: int) -> int:
        self._check(block)
        return self._refcounts[block]

    def is_free(self, block: int) -> bool:
        """True if the block is on the free list (not held and not parked)."""
        self._check(block)
        return self._on_free_list[block]

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks off the free list: held ones and parked ones."""
        return self.num_blocks - len(self._free)

    def __repr__(self) -> str:
        return f"BlockAllocator({self.name!r}, free={self.num_free}/{self.num_blocks})"

    def _check(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block must be in [0, {self.num_blocks}) for the {self.name} "
                             f"pool, got {block!r}")
