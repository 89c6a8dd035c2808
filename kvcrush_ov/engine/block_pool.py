"""Physical KV blocks with reference counts.

A block is an index into every layer's key / value cache tensors ([num_blocks, kv_heads, ...]).
Several sequences may share a block (a fork after prefill shares all of its parent's blocks);
a block returns to the free list when its last holder frees it.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence

import numpy as np


class NoFreeBlocks(RuntimeError):
    """Raised by :meth:`BlockPool.allocate` when fewer blocks are free than asked for."""


class BlockPool:
    """``num_blocks`` physical blocks; allocation order is FIFO over the free list.

    ``group``: blocks ``[g * group, (g + 1) * group)`` form group ``g`` (the per-head cache
    manager's pools: one group = the KV heads of one plain block, so a table whose heads hold
    whole groups, head ``h`` block ``g * group + h``, is also a plain block table; see
    HeadKVCacheManager). :meth:`full_groups` / :meth:`take_groups` allocate whole groups.
    """

    def __init__(self, num_blocks: int, group: int = 1,
                 _rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        if group < 1 or num_blocks % group:
            raise ValueError(f"group={group} must be >= 1 and divide num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.group = group
        # holders per block, which blocks are free, free blocks per group: own arrays, or rows
        # of a stack's (stacked())
        if _rows is None:
            _rows = (np.zeros(num_blocks, np.int64), np.ones(num_blocks, bool),
                     np.full(num_blocks // group, group, np.int64))
        self._ref, self._is_free, self._group_free = _rows
        # the free list may hold stale entries (blocks take_groups took out of its middle):
        # _is_free says which entries count; a freed block is appended again
        self._free: deque[int] = deque(range(num_blocks))
        self._num_free = num_blocks
        self.peak_used = 0

    @staticmethod
    def stacked(count: int, num_blocks: int, group: int = 1) -> PoolStack:
        """``count`` pools of ``num_blocks`` blocks whose state arrays are rows of shared 2-D
        arrays, so :class:`PoolStack` takes the same groups from all of them in one pass (the
        per-head cache manager's layers)."""
        return PoolStack(count, num_blocks, group)

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._num_free

    def ref_count(self, block: int) -> int:
        return int(self._ref[block])

    def ref_counts(self, blocks: np.ndarray) -> np.ndarray:
        """int64 [n]: the reference counts of ``blocks`` (int64 [n])."""
        return self._ref[blocks]

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks (reference count 1 each)."""
        if n > self._num_free:
            raise NoFreeBlocks(f"asked for {n} blocks, {self._num_free} free")
        out: list[int] = []
        free, is_free = self._free, self._is_free
        while len(out) < n:
            b = free.popleft()
            if is_free[b]:
                is_free[b] = False
                out.append(b)
        self._taken(np.asarray(out, dtype=np.int64))
        return out

    def full_groups(self) -> np.ndarray:
        """bool [num_blocks // group]: groups whose blocks are all free."""
        return self._group_free == self.group

    def take_groups(self, groups: np.ndarray) -> np.ndarray:
        """Take every block of ``groups`` (int64 [n], distinct, each one of
        :meth:`full_groups`); returns int64 [n, group]: block ``g * group + j`` at ``[i, j]``."""
        groups = np.asarray(groups, dtype=np.int64)
        if (self._group_free[groups] != self.group).any():
            raise AssertionError(f"take_groups: a group of {groups.tolist()} is not free")
        blocks = groups[:, None] * self.group + np.arange(self.group)
        flat = blocks.reshape(-1)
        self._is_free[flat] = False  # their free-list entries become stale
        self._ref[flat] = 1
        self._group_free[groups] = 0
        self._num_free -= len(flat)
        self.peak_used = max(self.peak_used, self.num_used)
        if len(self._free) > 2 * self.num_blocks + 64:  # drop the stale entries
            self._free = deque(b for b in self._free if self._is_free[b])
        return blocks

    def _taken(self, blocks: np.ndarray) -> None:
        self._ref[blocks] = 1
        np.subtract.at(self._group_free, blocks // self.group, 1)
        self._num_free -= len(blocks)
        self.peak_used = max(self.peak_used, self.num_used)

    def _released(self, blocks: list[int]) -> None:
        """``blocks`` (now unheld) back on the free list."""
        self._is_free[blocks] = True
        self._free.extend(blocks)
        np.add.at(self._group_free, np.asarray(blocks, dtype=np.int64) // self.group, 1)
        self._num_free += len(blocks)

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
                self._released(arr[ref == 1].tolist())
                return
        released = []
        for b in blocks:
            if self._ref[b] <= 0:
                raise AssertionError(f"block {b} freed twice")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                released.append(int(b))
        if released:
            self._released(released)

    def check_invariants(self, holders: list[list[int]] | None = None) -> None:
        """Free blocks == blocks with no holder, each on the free list, the counters right;
        with ``holders`` (every block table alive), each block's reference count equals how
        many tables hold it."""
        listed = set(self._free)
        for b, r in enumerate(self._ref.tolist()):
            if r < 0 or (r == 0) != bool(self._is_free[b]):
                raise AssertionError(f"block {b}: ref {r}, free: {bool(self._is_free[b])}")
            if r == 0 and b not in listed:
                raise AssertionError(f"block {b} is free but not on the free list")
        if self._num_free != int(self._is_free.sum()):
            raise AssertionError(f"{self._num_free} free blocks counted, "
                                 f"{int(self._is_free.sum())} free")
        if not np.array_equal(self._group_free,
                              self._is_free.reshape(-1, self.group).sum(axis=1)):
            raise AssertionError("free blocks per group miscounted")
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


class PoolStack(list):
    """A list of :class:`BlockPool` (one per layer) sharing 2-D state arrays ``[count, ...]``:
    :meth:`full_groups` and :meth:`take_groups` work on every pool at once."""

    def __init__(self, count: int, num_blocks: int, group: int) -> None:
        if count < 1:
            raise ValueError(f"count={count} must be >= 1")
        self.ref = np.zeros((count, num_blocks), np.int64)
        self.is_free = np.ones((count, num_blocks), bool)
        self.group_free = np.full((count, num_blocks // group), group, np.int64)
        super().__init__(BlockPool(num_blocks, group, (self.ref[i], self.is_free[i],
                                                       self.group_free[i]))
                         for i in range(count))

    def full_groups(self) -> np.ndarray:
        """bool [num_blocks // group]: groups whose blocks are free in every pool."""
        return (self.group_free == self[0].group).all(axis=0)

    def first_full_groups(self, n: int) -> np.ndarray | None:
        """int64 [n]: the ``n`` lowest groups free in every pool, or None if fewer are. Scans
        from group 0 in growing windows (freed groups come back low: a whole cache's
        [layers, groups] is 0.3 ms a call on a large cache)."""
        g, num_groups = self[0].group, self.group_free.shape[1]
        found: list[int] = []
        start, width = 0, max(64, 2 * n)
        while start < num_groups and len(found) < n:
            window = self.group_free[:, start:start + width]
            free = np.flatnonzero((window == g).all(axis=0))[:n - len(found)]
            found.extend((free + start).tolist())
            start += width
            width *= 4
        return np.asarray(found, np.int64) if len(found) == n else None

    def take_groups(self, groups: np.ndarray) -> np.ndarray:
        """:meth:`BlockPool.take_groups` of ``groups`` in every pool (one numpy pass)."""
        groups = np.asarray(groups, dtype=np.int64)
        g = self[0].group
        if (self.group_free[:, groups] != g).any():
            raise AssertionError(f"take_groups: a group of {groups.tolist()} is not free")
        blocks = groups[:, None] * g + np.arange(g)
        flat = blocks.reshape(-1)
        self.is_free[:, flat] = False
        self.ref[:, flat] = 1
        self.group_free[:, groups] = 0
        for pool in self:
            pool._num_free -= len(flat)
            pool.peak_used = max(pool.peak_used, pool.num_used)
            if len(pool._free) > 2 * pool.num_blocks + 64:  # drop the stale entries
                pool._free = deque(b for b in pool._free if pool._is_free[b])
        return blocks

    def free_tables(self, blocks: list[list[int]]) -> None:
        """:meth:`BlockPool.free` of ``blocks[l]`` in pool ``l`` for every layer in one numpy
        pass; each list holds distinct blocks (a sequence's per-head tables never share one)."""
        counts = [len(b) for b in blocks]
        total = sum(counts)
        if not total:
            return
        layer = np.repeat(np.arange(len(self)), counts)
        flat = np.fromiter(itertools.chain.from_iterable(blocks), np.int64, total)
        ref = self.ref[layer, flat]
        if (ref <= 0).any():
            i = int(np.argmax(ref <= 0))
            raise AssertionError(f"block {int(flat[i])} of layer {int(layer[i])} freed twice")
        self.ref[layer, flat] = ref - 1
        released = ref == 1
        rl, rb = layer[released], flat[released]
        self.is_free[rl, rb] = True
        np.add.at(self.group_free, (rl, rb // self[0].group), 1)
        per = np.bincount(rl, minlength=len(self)).tolist()
        ids = rb.tolist()
        at = 0
        for pool, n in zip(self, per, strict=True):
            if n:
                pool._free.extend(ids[at:at + n])
                pool._num_free += n
                at += n
