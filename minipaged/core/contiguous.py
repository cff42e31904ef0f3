"""The contiguous baselines of the paper: Orca (Max), Orca (Pow2) and Orca (Oracle).

Paper section 2.3 and Fig. 2 / Fig. 3: before PagedAttention, a serving system stored
each request's KV cache in ONE contiguous region, reserved when the request is admitted
and big enough for every token it might ever hold. The three baselines differ only in
how much they reserve:

- Orca (Max) reserves the model's maximum sequence length, ``max_len``;
- Orca (Pow2) reserves the next power of two of the request's final length (an
  over-estimate by at most 2x, capped at ``max_len``);
- Orca (Oracle) reserves exactly the final length (prompt + output) — impossible in
  practice, the baselines' best case.

The allocator here is real, not an estimate: one flat arena of ``capacity`` token slots,
first-fit placement (the lowest-addressed hole that is large enough), holes merged on
free. So external fragmentation happens for real: a request is refused when no single
hole fits it even though the holes together would.

Invariant to keep in mind: the arena is partitioned exactly into reservations and holes
— they never overlap, adjacent holes are always merged, and reserved + free = capacity.

Pure Python: every operation returns plain numbers; no tensor is touched.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Hashable, Literal

Policy = Literal["max", "pow2", "oracle"]
POLICIES: tuple[str, ...] = ("max", "pow2", "oracle")


class NoContiguousSpaceError(RuntimeError):
    """No single hole of the arena is large enough for the reservation."""


class ReservationExceededError(ValueError):
    """A request tried to grow past the region reserved for it."""


@dataclass
class Reservation:
    """One request's region of the arena: ``[start, start + size)``.

    ``length`` slots (from ``start``) hold token state; the request will finish at
    ``final_len`` tokens, so ``[length, final_len)`` is reserved for its future tokens
    and ``[final_len, size)`` can never be used (internal fragmentation).
    """

    start: int
    size: int
    prompt_len: int
    final_len: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.size


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return 1 << (n - 1).bit_length()


class ContiguousAllocator:
    """One flat arena of ``capacity`` token slots, one contiguous region per request.

    >>> a = ContiguousAllocator(capacity=16, policy="oracle", max_len=8)
    >>> a.allocate("a", prompt_len=3, final_len=5)
    (0, 5)
    >>> a.append("a"); a.tokens("a"), a.reserved("a")
    (4, 5)
    >>> a.holes()
    [(5, 11)]
    """

    def __init__(self, capacity: int, policy: Policy = "max", max_len: int = 2048) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.capacity = capacity
        self.policy: Policy = policy
        self.max_len = max_len
        self._regions: dict[Hashable, Reservation] = {}
        # Holes as two parallel lists sorted by start address, so first fit is a scan
        # from the left and merging a freed region is two bisects.
        self._hole_starts: list[int] = [0]
        self._hole_sizes: list[int] = [capacity]

    # ------------------------------------------------------------------ sizing

    def reservation_size(self, prompt_len: int, final_len: int) -> int:
        """How many slots this policy reserves for a request (paper section 2.3)."""
        self._check_lengths(prompt_len, final_len)
        if self.policy == "max":
            return self.max_len
        if self.policy == "pow2":
            return min(next_power_of_two(final_len), self.max_len)
        return final_len  # oracle

    def _check_lengths(self, prompt_len: int, final_len: int) -> None:
        if prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
        if final_len < prompt_len:
            raise ValueError(f"final_len ({final_len}) must be >= prompt_len ({prompt_len})")
        if final_len > self.max_len:
            raise ValueError(f"final_len ({final_len}) exceeds max_len ({self.max_len})")

    # ------------------------------------------------------------------ placement

    def find_hole(self, size: int) -> int | None:
        """First fit: the start of the lowest-addressed hole of at least ``size`` slots."""
        for start, hole in zip(self._hole_starts, self._hole_sizes):
            if hole >= size:
                return start
        return None

    def can_allocate(self, prompt_len: int, final_len: int) -> bool:
        """Whether some single hole fits this request's reservation right now."""
        return self.find_hole(self.reservation_size(prompt_len, final_len)) is not None

    def allocate(self, seq_id: Hashable, prompt_len: int, final_len: int) -> tuple[int, int]:
        """Reserve a region for a new request; its prompt fills the first slots.

        Returns ``(start, size)``. Raises NoContiguousSpaceError when no single hole is
        large enough, even if the free slots in total would be (external fragmentation).
        """
        if seq_id in self._regions:
            raise ValueError(f"seq_id {seq_id!r} is already allocated")
        size = self.reservation_size(prompt_len, final_len)
        start = self.find_hole(size)
        if start is None:
            raise NoContiguousSpaceError(
                f"no hole of {size} contiguous slots for seq {seq_id!r} "
                f"(free: {self.num_free}, largest hole: {self.largest_hole})"
            )
        i = self._hole_starts.index(start)
        if self._hole_sizes[i] == size:
            del self._hole_starts[i], self._hole_sizes[i]
        else:  # keep the hole's remainder to the right of the new region
            self._hole_starts[i] += size
            self._hole_sizes[i] -= size
        self._regions[seq_id] = Reservation(start, size, prompt_len, final_len, prompt_len)
        return start, size

    def append(self, seq_id: Hashable, n: int = 1) -> None:
        """Grow a request's token state by ``n`` slots inside its reservation."""
        region = self._region(seq_id)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if region.length + n > region.size:
            raise ReservationExceededError(
                f"seq {seq_id!r} would grow to {region.length + n} tokens, "
                f"past its reservation of {region.size}"
            )
        if region.length + n > region.final_len:
            raise ValueError(
                f"seq {seq_id!r} would grow to {region.length + n} tokens, "
                f"past its final_len of {region.final_len}"
            )
        region.length += n

    def free(self, seq_id: Hashable) -> None:
        """Return a request's region to the arena, merging it with adjacent holes."""
        region = self._regions.pop(seq_id, None)
        if region is None:
            raise KeyError(f"seq_id {seq_id!r} is not allocated")
        start, size = region.start, region.size
        i = bisect.bisect_left(self._hole_starts, start)
        # merge with the hole that ends where this region starts
        if i > 0 and self._hole_starts[i - 1] + self._hole_sizes[i - 1] == start:
            i -= 1
            start = self._hole_starts[i]
            size += self._hole_sizes[i]
            del self._hole_starts[i], self._hole_sizes[i]
        # merge with the hole that starts where this region ends
        if i < len(self._hole_starts) and self._hole_starts[i] == start + size:
            size += self._hole_sizes[i]
            del self._hole_starts[i], self._hole_sizes[i]
        self._hole_starts.insert(i, start)
        self._hole_sizes.insert(i, size)

    # ------------------------------------------------------------------ queries

    def _region(self, seq_id: Hashable) -> Reservation:
        try:
            return self._regions[seq_id]
        except KeyError:
            raise KeyError(f"seq_id {seq_id!r} is not allocated") from None

    def holes(self) -> list[tuple[int, int]]:
        """The free holes as ``(start, size)``, sorted by address."""
        return list(zip(self._hole_starts, self._hole_sizes))

    def regions(self) -> dict[Hashable, Reservation]:
        """A copy of every live reservation, by seq id."""
        return {k: Reservation(**vars(r)) for k, r in self._regions.items()}

    def region(self, seq_id: Hashable) -> Reservation:
        """A copy of one request's reservation."""
        return Reservation(**vars(self._region(seq_id)))

    def tokens(self, seq_id: Hashable) -> int:
        """How many slots of the request hold token state now."""
        return self._region(seq_id).length

    def reserved(self, seq_id: Hashable) -> int:
        """How many slots are reserved for the request in total."""
        return self._region(seq_id).size

    def final_len(self, seq_id: Hashable) -> int:
        return self._region(seq_id).final_len

    @property
    def seq_ids(self) -> list[Hashable]:
        return list(self._regions)

    @property
    def num_free(self) -> int:
        return sum(self._hole_sizes)

    @property
    def num_reserved(self) -> int:
        return sum(r.size for r in self._regions.values())

    @property
    def largest_hole(self) -> int:
        return max(self._hole_sizes, default=0)

    @property
    def usage(self) -> float:
        """Share of the arena that is reserved (not free)."""
        return 1.0 - self.num_free / self.capacity

    def __repr__(self) -> str:
        return (
            f"ContiguousAllocator(capacity={self.capacity}, policy={self.policy!r}, "
            f"max_len={self.max_len}, seqs={len(self._regions)}, free={self.num_free})"
        )


def OrcaMax(capacity: int, max_len: int = 2048) -> ContiguousAllocator:
    """Orca (Max): every request reserves ``max_len`` slots."""
    return ContiguousAllocator(capacity, "max", max_len)


def OrcaPow2(capacity: int, max_len: int = 2048) -> ContiguousAllocator:
    """Orca (Pow2): every request reserves the next power of two of its final length."""
    return ContiguousAllocator(capacity, "pow2", max_len)


def OrcaOracle(capacity: int, max_len: int = 2048) -> ContiguousAllocator:
    """Orca (Oracle): every request reserves exactly its final length."""
    return ContiguousAllocator(capacity, "oracle", max_len)
