"""First-fit extent allocator for a registered byte arena (prefill send arena, decode receive buffer)."""
from __future__ import annotations

import bisect
import threading

ALIGN = 256


def _align(x: int, a: int = ALIGN) -> int:
    return (x + a - 1) // a * a


class ArenaFullError(RuntimeError):
    """Not enough contiguous free space in the arena for the requested extent."""


class ExtentAllocator:
    """Manages ``[0, capacity)`` as sorted, coalesced free extents; all offsets are ``ALIGN``-aligned."""

    def __init__(self, capacity: int):
        self.capacity = capacity - capacity % ALIGN
        self._free: list[tuple[int, int]] = [(0, self.capacity)] if self.capacity else []  # (offset, size)
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    @property
    def num_extents(self) -> int:
        return len(self._used)

    def largest_free(self) -> int:
        return max((s for _, s in self._free), default=0)

    def allocate(self, size: int) -> int:
        """Reserve ``size`` bytes; returns the offset or raises :class:`ArenaFullError`."""
        size = _align(max(size, 1))
        with self._lock:
            for i, (off, sz) in enumerate(self._free):
                if sz >= size:
                    if sz == size:
                        self._free.pop(i)
                    else:
                        self._free[i] = (off + size, sz - size)
                    self._used[off] = size
                    return off
        raise ArenaFullError(f"arena has no free extent of {size} bytes "
                             f"(capacity {self.capacity}, in use {self.used_bytes}, "
                             f"largest free {self.largest_free()})")

    def size_of(self, offset: int) -> int:
        return self._used[offset]

    def shrink(self, offset: int, new_size: int) -> None:
        """Give back the tail of an extent after its real length is known."""
        new_size = _align(max(new_size, 1))
        with self._lock:
            old = self._used[offset]
            if new_size >= old:
                return
            self._used[offset] = new_size
            self._insert_free(offset + new_size, old - new_size)

    def free(self, offset: int) -> None:
        with self._lock:
            size = self._used.pop(offset)
            self._insert_free(offset, size)

    def _insert_free(self, off: int, size: int) -> None:
        i = bisect.bisect_left(self._free, (off, 0))
        self._free.insert(i, (off, size))
        # coalesce with next, then previous
        if i + 1 < len(self._free) and off + size == self._free[i + 1][0]:
            self._free[i] = (off, size + self._free[i + 1][1])
            self._free.pop(i + 1)
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:
            poff, psz = self._free[i - 1]
            self._free[i - 1] = (poff, psz + self._free[i][1])
            self._free.pop(i)
