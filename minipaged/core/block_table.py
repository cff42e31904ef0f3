"""One sequence's block table: logical block i -> physical block (paper section 4.2, Fig. 6).

A sequence's tokens are contiguous *logically* (token i lives in logical block
``i // block_size`` at offset ``i % block_size``) but its physical blocks can be anywhere
in the pool. The table is the only link between the two, which is what lets blocks be
allocated on demand (section 4.3) and shared between sequences (section 4.4).

Invariant to keep in mind: the table holds exactly ``ceil(num_tokens / block_size)``
blocks — only the last one may be partly filled — so at most ``block_size - 1`` slots
of a sequence are ever wasted.

`remap` rewrites a group's tables into another pool: that is all swapping (section
4.5) does to tables; the cache engine copies the data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class BlockTable:
    """Physical block ids of one sequence plus how many token slots it uses."""

    __slots__ = ("block_size", "blocks", "num_tokens")

    def __init__(self, block_size: int, blocks: list[int] | None = None,
                 num_tokens: int = 0) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size!r}")
        self.block_size = block_size
        self.blocks: list[int] = list(blocks) if blocks is not None else []
        self.num_tokens = num_tokens

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_empty_slots(self) -> int:
        """Slots left in the last block before a new one is needed."""
        return len(self.blocks) * self.block_size - self.num_tokens

    def slot(self, i: int) -> int:
        """The flat cache slot of token i: ``table[i // B] * B + i % B``."""
        if not 0 <= i < self.num_tokens:
            raise ValueError(f"token index i must be in [0, {self.num_tokens}), got {i!r}")
        return self.blocks[i // self.block_size] * self.block_size + i % self.block_size

    def slots(self, start: int = 0, end: int | None = None) -> list[int]:
        """Slots of tokens ``start .. end - 1`` (the slot mapping of a chunk)."""
        end = self.num_tokens if end is None else end
        return [self.slot(i) for i in range(start, end)]

    def copy(self) -> BlockTable:
        return BlockTable(self.block_size, self.blocks, self.num_tokens)

    def __len__(self) -> int:
        """The number of blocks (a table is a list of blocks; see num_tokens for tokens)."""
        return len(self.blocks)

    def __repr__(self) -> str:
        return f"BlockTable(blocks={self.blocks}, num_tokens={self.num_tokens})"


def distinct_blocks(tables: Iterable[BlockTable]) -> list[int]:
    """The blocks a group of tables holds, each once, in order of first appearance."""
    return list(dict.fromkeys(b for table in tables for b in table.blocks))


def remap(tables: list[BlockTable], take: Callable[[], int], share: Callable[[int], None],
          release: Callable[[int], None]) -> list[tuple[int, int]]:
    """Point a group of tables at new blocks of another pool (swapping, section 4.5).

    Each distinct old block gets ONE new block from `take` (shared within the group by
    calling `share` once per further table holding it, so its refcount matches); each
    table entry lets go of its old block with `release`, deepest block first. Returns the
    ``(old, new)`` pairs whose contents the cache engine must copy.
    """
    mapping: dict[int, int] = {}
    for table in tables:
        old = table.blocks
        for block in old:
            if block in mapping:
                share(mapping[block])
            else:
                mapping[block] = take()
        table.blocks = [mapping[b] for b in old]
        for block in reversed(old):
            release(block)
    return list(mapping.items())
