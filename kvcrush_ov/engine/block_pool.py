"""Physical KV blocks with reference counts.

A block is an index into every layer's key / value cache tensors ([num_blocks, kv_heads, ...]).
Several sequences may share a block (a fork after prefill shares all of its parent's blocks);
a block returns to the free list when its last holder frees it.
"""

from __future__ import annotations

from collections import deque


class NoFreeBlocks(RuntimeError):
    """Raised by :meth:`BlockPool.allocate` when fewer blocks are free than asked for."""


class BlockPool:
    """``num_blocks`` physical blocks; allocation order is FIFO over the free list."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.num_blocks = num_blocks
        self._ref = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks (reference count 1 each)."""
        if n > len(self._free):
            raise NoFreeBlocks(f"asked for {n} blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._ref[b] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return out

    def share(self, blocks: list[int]) -> None:
        """One more holder for each of ``blocks`` (a fork)."""
        for b in blocks:
            if self._ref[b] <= 0:
                raise AssertionError(f"block {b} is free and cannot be shared")
            self._ref[b] += 1

    def free(self, blocks: list[int]) -> None:
        """One holder fewer for each of ``blocks``; blocks nobody holds become free."""
        for b in blocks:
            if self._ref[b] <= 0:
                raise AssertionError(f"block {b} freed twice")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)

    def check_invariants(self, holders: list[list[int]] | None = None) -> None:
        """Free list == blocks with no holder, no duplicates; with ``holders`` (every block
        table alive), each block's reference count equals how many tables hold it."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        for b, r in enumerate(self._ref):
            if r < 0 or (r == 0) != (b in free):
                raise AssertionError(f"block {b}: ref {r}, on free list: {b in free}")
        if holders is not None:
            counts = [0] * self.num_blocks
            for table in holders:
                for b in table:
                    counts[b] += 1
            if counts != self._ref:
                bad = next(i for i, (c, r) in enumerate(zip(counts, self._ref, strict=True))
                           if c != r)
                raise AssertionError(f"block {bad}: held {counts[bad]} times, ref {self._ref[bad]}")
