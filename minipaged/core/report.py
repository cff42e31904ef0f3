"""Where the KV memory goes: the paper's Fig. 2 categories, counted for any allocator.

Paper section 2.3 / Fig. 2 splits the KV cache memory of a serving system into token
states and three kinds of waste; Fig. 3 draws them. `report` counts them, in token
slots, for a `ContiguousAllocator` (the Orca baselines) or a `BlockManager` (paged) at
any moment (`minipaged.core.memory_map` draws the picture).

The categories (every slot of the device memory is in exactly one of the first four):

- ``token_state``: slots holding the K/V of a token of a live request. A physical block
  shared by several sequences (fork, shared prompt) is counted once.
- ``reserved_unused``: slots reserved for a request's *future* tokens — in a contiguous
  reservation, the slots from the current length up to the request's final length.
  Paged memory reserves nothing ahead: 0 by construction.
- ``internal_fragmentation``: allocated slots that will never hold token state of the
  request — contiguous: the reservation beyond the request's final length (the policy
  over-estimated it); paged: the unused tail of each sequence's last, partly filled
  block (the block manager does not know the final length, so the whole tail counts,
  as the paper's Fig. 2 does for vLLM). Shared blocks are counted once.
- ``free``: slots that belong to no request (holes of the arena; free blocks, which
  include evictable prefix-cache blocks, since an allocation may take them).

and, as a part of ``free``:

- ``external_fragmentation``: free slots that cannot be used — contiguous: the slots of
  every hole smaller than the reservation of the next request to admit (the argument
  ``next_reservation``; when none is given, the mean reservation of the live requests,
  i.e. a typical request; with no live request either, 0). Paged: 0 by construction,
  since any free block serves any request.

So ``token_state + reserved_unused + internal_fragmentation + free == total`` always.

Utilisation, two ways:

- ``utilisation = token_state / (total - free)``: the share of the memory in use
  (allocated or reserved) that holds token state.
- ``paper_utilisation = token_state / (total - free + external_fragmentation)``: the
  paper's Fig. 2 share, where the pie is token states plus all three kinds of waste.

Invariant to keep in mind: the four categories partition the memory; external
fragmentation is a judgement about some of the free slots, not a fifth category.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from minipaged.core.contiguous import ContiguousAllocator


@dataclass(frozen=True)
class MemoryReport:
    """The device KV memory at one moment, in token slots (see the module docstring)."""

    total: int
    token_state: int
    reserved_unused: int
    internal_fragmentation: int
    external_fragmentation: int
    free: int
    num_seqs: int = 0

    def __post_init__(self) -> None:
        parts = self.token_state + self.reserved_unused + self.internal_fragmentation + self.free
        if parts != self.total:
            raise ValueError(f"categories sum to {parts}, not total={self.total}")
        if not 0 <= self.external_fragmentation <= self.free:
            raise ValueError("external_fragmentation must be part of free")

    @property
    def allocated(self) -> int:
        """Slots in use: token state plus reserved plus internal fragmentation."""
        return self.total - self.free

    @property
    def wasted(self) -> int:
        """Slots lost to the paper's three kinds of waste."""
        return self.reserved_unused + self.internal_fragmentation + self.external_fragmentation

    @property
    def utilisation(self) -> float:
        """token_state / allocated slots; 0.0 when nothing is allocated."""
        return self.token_state / self.allocated if self.allocated else 0.0

    @property
    def paper_utilisation(self) -> float:
        """token_state / (token_state + the three kinds of waste), as in Fig. 2."""
        pie = self.token_state + self.wasted
        return self.token_state / pie if pie else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "utilisation": self.utilisation,
                "paper_utilisation": self.paper_utilisation}

    def __str__(self) -> str:
        return (
            f"utilisation {self.utilisation:6.1%} (token state {self.token_state} of "
            f"{self.allocated} allocated slots; paper's Fig. 2 share "
            f"{self.paper_utilisation:.1%}) | reserved {self.reserved_unused}, internal "
            f"frag {self.internal_fragmentation}, external frag "
            f"{self.external_fragmentation}, free {self.free} of {self.total}"
        )


def report(allocator: Any, next_reservation: int | None = None,
           seq_ids: Iterable[Hashable] | None = None) -> MemoryReport:
    """Count the memory of a ContiguousAllocator or a BlockManager.

    ``next_reservation`` (contiguous only): the size of the next request's reservation,
    which decides which holes are external fragmentation. ``seq_ids`` (paged only): the
    live sequences, by default every sequence the block manager holds on the device.
    """
    if isinstance(allocator, ContiguousAllocator):
        return _contiguous_report(allocator, next_reservation)
    if hasattr(allocator, "get_block_table") and hasattr(allocator, "block_size"):
        return _paged_report(allocator, seq_ids)
    raise ValueError(f"allocator must be a ContiguousAllocator or a BlockManager, "
                     f"got {type(allocator).__name__}")


# ---- contiguous ----------------------------------------------------------------------


def unusable_hole_threshold(alloc: ContiguousAllocator, next_reservation: int | None) -> float:
    """Holes smaller than this are external fragmentation (see the module docstring)."""
    if next_reservation is not None:
        if next_reservation < 1:
            raise ValueError(f"next_reservation must be >= 1, got {next_reservation}")
        return next_reservation
    sizes = [r.size for r in alloc.regions().values()]
    return sum(sizes) / len(sizes) if sizes else 0


def _contiguous_report(alloc: ContiguousAllocator, next_reservation: int | None) -> MemoryReport:
    regions = alloc.regions().values()
    threshold = unusable_hole_threshold(alloc, next_reservation)
    return MemoryReport(
        total=alloc.capacity,
        token_state=sum(r.length for r in regions),
        reserved_unused=sum(r.final_len - r.length for r in regions),
        internal_fragmentation=sum(r.size - r.final_len for r in regions),
        external_fragmentation=sum(size for _, size in alloc.holes() if size < threshold),
        free=alloc.num_free,
        num_seqs=len(regions),
    )


# ---- paged ---------------------------------------------------------------------------


def live_seq_ids(manager: Any) -> list[Hashable]:
    """Every sequence a block manager holds on the device (swapped-out ones excluded).

    Uses the manager's public ``seq_ids`` / ``is_swapped`` when it has them; otherwise
    reads its private sequence dict (the contract of issue 2 has no listing).
    """
    ids = getattr(manager, "seq_ids", None)
    if callable(ids):
        ids = ids()
    if ids is None:
        ids = list(manager._seqs)
    return [s for s in ids if not _is_swapped(manager, s)]


def _is_swapped(manager: Any, seq: Hashable) -> bool:
    is_swapped = getattr(manager, "is_swapped", None)
    if callable(is_swapped):
        return bool(is_swapped(seq))
    return bool(getattr(getattr(manager, "_seqs", {}).get(seq), "swapped", False))


def _num_tokens(manager: Any, seq: Hashable) -> int:
    num_tokens = getattr(manager, "num_tokens", None)
    return num_tokens(seq) if callable(num_tokens) else len(manager.get_token_ids(seq))


def paged_block_fill(manager: Any, seq_ids: Iterable[Hashable] | None = None
                     ) -> tuple[dict[int, int], Counter]:
    """For each held device block, the slots holding token state, and how many of the
    sequences map it. A shared block holds the same tokens for all of its sharers, so
    its fill is the largest any of them sees (a sharer that wrote past it has copied)."""
    bs = manager.block_size
    fill: dict[int, int] = {}
    sharers: Counter = Counter()
    for seq in live_seq_ids(manager) if seq_ids is None else seq_ids:
        n = _num_tokens(manager, seq)
        for i, block in enumerate(manager.get_block_table(seq)):
            fill[block] = max(fill.get(block, 0), min(bs, n - i * bs))
            sharers[block] += 1
    return fill, sharers


def _paged_report(manager: Any, seq_ids: Iterable[Hashable] | None) -> MemoryReport:
    """Same numbers as summing `paged_block_fill`, faster: every block of a table but
    the last is full, so only last blocks need a look (replays call this every step)."""
    seqs = live_seq_ids(manager) if seq_ids is None else list(seq_ids)
    bs = manager.block_size
    full: set[int] = set()
    partial: dict[int, int] = {}   # a partly filled last block -> its fill
    for seq in seqs:
        table = manager.get_block_table(seq)
        if not table:
            continue
        full.update(table[:-1])
        last_fill = _num_tokens(manager, seq) - (len(table) - 1) * bs
        if last_fill == bs:
            full.add(table[-1])
        else:
            partial[table[-1]] = max(partial.get(table[-1], 0), last_fill)
    partial = {b: f for b, f in partial.items() if b not in full}
    held = len(full) + len(partial)
    token_state = len(full) * bs + sum(partial.values())
    return MemoryReport(
        total=manager.num_blocks * bs,
        token_state=token_state,
        reserved_unused=0,
        internal_fragmentation=held * bs - token_state,
        external_fragmentation=0,
        free=(manager.num_blocks - held) * bs,
        num_seqs=len(seqs),
    )
