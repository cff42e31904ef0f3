"""The paper's Fig. 3 as text: a memory map of the KV cache, one character per slot.

`render_memory_map` draws a `ContiguousAllocator` (the Orca baselines: each request's
reservation, its token states, what it reserved ahead and what it will never fill) or a
`BlockManager` (paged: whole blocks, each filled from its start, free blocks anywhere),
in the categories that `minipaged.core.report` counts. The pictures are for reading:
tutorial 2 and `minipaged memory-demo` print them.

Invariant: a slot's character is its category in `report` (the same threshold decides
which free holes are external fragmentation), so the picture and the numbers agree.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from minipaged.core.contiguous import ContiguousAllocator
from minipaged.core.report import paged_block_fill, unusable_hole_threshold

# One character per category (report's), as the paper's Fig. 3 colours them.
TOKEN, SHARED, RESERVED, INTERNAL, FREE, EXTERNAL = "#", "=", "+", "-", ".", "x"
LEGEND = (
    f"{TOKEN} token state  {SHARED} shared token state  {RESERVED} reserved  "
    f"{INTERNAL} internal frag.  {EXTERNAL} external frag.  {FREE} free"
)


def contiguous_slot_chars(alloc: ContiguousAllocator,
                          next_reservation: int | None = None) -> str:
    """One character per slot of the arena, in address order."""
    chars = [FREE] * alloc.capacity
    threshold = unusable_hole_threshold(alloc, next_reservation)
    for start, size in alloc.holes():
        if size < threshold:
            chars[start:start + size] = EXTERNAL * size
    for r in alloc.regions().values():
        chars[r.start:r.end] = (TOKEN * r.length + RESERVED * (r.final_len - r.length)
                                + INTERNAL * (r.size - r.final_len))
    return "".join(chars)


def paged_block_chars(manager: Any) -> list[str]:
    """One string of ``block_size`` characters per physical block, in block-id order."""
    bs = manager.block_size
    fill, sharers = paged_block_fill(manager)
    out = []
    for block in range(manager.num_blocks):
        if block not in fill:
            out.append(FREE * bs)
        else:
            tok = SHARED if sharers[block] > 1 else TOKEN
            out.append(tok * fill[block] + INTERNAL * (bs - fill[block]))
    return out


def _majority(chunk: str) -> str:
    counts = Counter(chunk)
    return max(counts, key=lambda c: (counts[c], c != FREE))


def render_memory_map(allocator: Any, width: int = 64, next_reservation: int | None = None,
                      max_rows: int = 32, legend: bool = True) -> str:
    """The memory as text, like the paper's Fig. 3: one row of characters per ``width``.

    Contiguous: one character per slot. Paged: one character per slot with ``|`` between
    blocks (whole blocks per row). When that would take more than ``max_rows`` rows,
    each character stands for several slots (contiguous) or one whole block (paged), and
    shows the most common category among them.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if isinstance(allocator, ContiguousAllocator):
        slots = contiguous_slot_chars(allocator, next_reservation)
        scale = max(1, -(-len(slots) // (width * max_rows)))
        cells = [_majority(slots[i:i + scale]) for i in range(0, len(slots), scale)]
        rows = ["".join(cells[i:i + width]) for i in range(0, len(cells), width)]
        unit = "slot" if scale == 1 else f"{scale} slots"
        head = (f"contiguous arena ({allocator.policy}), {allocator.capacity} slots, "
                f"1 char = {unit}")
    elif hasattr(allocator, "get_block_table"):
        blocks = paged_block_chars(allocator)
        bs = allocator.block_size
        per_row = max(1, width // (bs + 1))
        if -(-len(blocks) // per_row) <= max_rows:
            rows = ["|".join(blocks[i:i + per_row]) for i in range(0, len(blocks), per_row)]
            unit = "slot, | between blocks"
        else:
            cells = [_majority(b) for b in blocks]
            rows = ["".join(cells[i:i + width]) for i in range(0, len(cells), width)]
            unit = "block"
        head = (f"paged: {allocator.num_blocks} blocks x {bs} slots, 1 char = {unit}")
    else:
        raise ValueError(f"allocator must be a ContiguousAllocator or a BlockManager, "
                         f"got {type(allocator).__name__}")
    lines = [head, *rows]
    if legend:
        lines.append(LEGEND)
    return "\n".join(lines)
