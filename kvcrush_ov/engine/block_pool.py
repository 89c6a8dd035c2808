"""Physical KV blocks with reference counts.

A block is an index into every layer's key / value cache tensors ([num_blocks, kv_heads, ...]).
Several sequences may share a block (a fork after prefill shares all of its parent's blocks);
a block returns to the free list when its last holder frees it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np


class NoFreeBlocks(RuntimeError):
    """Raised by :meth:`BlockPool.allocate` when fewer blocks are free than asked for."""


class BlockPool:
    """``num_blocks`` physical blocks; allocation order is FIFO over the free list."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.num_blocks = num_blocks
        self._ref = np.zeros(num_blocks, np.int64)  # holders per block
        self._free: deque[int] = deque(range(num_blocks))
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block: int) -> int:
        return int(self._ref[block])

    def ref_counts(self, blocks: np.ndarray) -> np.ndarray:
        """int64 [n]: the reference counts of ``blocks`` (int64 [n])."""
        return self._ref[blocks]

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks (reference count 1 each)."""
        if n > len(self._free):
            raise NoFreeBlocks(f"asked for {n} blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        self._ref[out] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return out

    def share(self, blocks: list[int]) -> None:
        """One more holder for each of ``blocks`` (a fork)."""
        arr = np.asarray(blocks, dtype=np.int64)
        free = self._ref[arr] <= 0
        if free.any():
            raise AssertionError(f"block {int(arr[np.argmax(free)])} is free and cannot be "
                                 "shared")
        np.add.at(self._ref, arr, 1)

    def free(self, blocks: Sequence[int] | np.ndarray) -> None:
        """One holder fewer for each of ``blocks`` (int list or int64 [n]); blocks nobody holds
        become free (appended to the free list in the order given)."""
        if len(blocks) > 8:  # a table's tail: distinct blocks, one numpy pass
            arr = np.asarray(blocks, dtype=np.int64)
            ref = self._ref[arr]
            if (ref > 0).all() and len(set(arr.tolist())) == len(arr):
                self._ref[arr] = ref - 1
                self._free.extend(arr[ref == 1].tolist())
                return
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
        for b, r in enumerate(self._ref.tolist()):
            if r < 0 or (r == 0) != (b in free):
                raise AssertionError(f"block {b}: ref {r}, on free list: {b in free}")
        if holders is not None:
            counts = [0] * self.num_blocks
            for table in holders:
                for b in table:
                    counts[b] += 1
            refs = self._ref.tolist()
            if counts != refs:
                bad = next(i for i, (c, r) in enumerate(zip(counts, refs, strict=True))
                           if c != r)
                raise AssertionError(f"block {bad}: held {counts[bad]} times, ref {refs[bad]}")
