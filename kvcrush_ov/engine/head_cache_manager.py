"""Per-layer, per-KV-head block tables (the cache manager of the per-head graph).

Every layer has its own pool of *head blocks* (one block of one KV head: ``block_size`` tokens of
that head's keys and values), so after eviction each (layer, head) of a sequence can hold a
different number of tokens. ``lens[l, h]`` tokens of sequence ``s`` sit in the first rows of its
table ``blocks[l][h]``; ``positions[l][h]`` gives each row's position. Rows are in position order
until an eviction fills holes (:func:`fill_holes`: attention does not depend on the order of the
cached rows, keys carry their RoPE rotation); new tokens are appended after the last row.
``num_written`` counts the sequence's positions whose K/V were written (RoPE positions continue
from there whatever was evicted).

Same interface as :class:`kvcrush_ov.engine.kv_cache_manager.KVCacheManager` for the scheduler
(``can_append``, ``append_slots``, ``fork``, ``free``, ``check_invariants``), plus
:meth:`compact` which applies an eviction decision and returns the row moves the model runner
must do in the cache tensors. Copy-on-write and compaction moves are ``(layer, ...)`` tuples.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from kvcrush_ov import _core
from kvcrush_ov.engine.block_pool import BlockPool, PoolStack
from kvcrush_ov.engine.kv_codec import FlatMoves

# (layer, dst_block, sources [n, 2] int64 (src_block, src_row)): write these rows densely into
# dst_block, in order
Move = tuple[int, int, np.ndarray]


@dataclass(frozen=True)
class SplitPlan:
    """FastKV's token-selective propagation for one sequence: while its prompt is computed,
    layers ``>= first_back_layer`` get no rows; the step that completes the prompt
    (``prompt_len`` positions) gives them ``num_propagated`` rows, whose positions the engine
    sets with :meth:`HeadKVCacheManager.set_positions` once it has chosen them."""

    first_back_layer: int
    prompt_len: int
    num_propagated: int


def fill_holes(keep: np.ndarray) -> np.ndarray:
    """The new row order after keeping rows ``keep`` (int64 [k], sorted, unique): kept rows below
    ``k`` stay where they are and the kept rows at or above ``k`` fill the holes below ``k``
    (ascending into ascending). Returns int64 [k]: new row ``i`` is old row ``order[i]``
    (C++: ``kvcrush::fill_holes``, which :meth:`HeadKVCacheManager.compact_flat` applies).

    Compacting with this order rewrites only the blocks that had a hole, instead of every block
    after the first hole (a decode-time eviction of 32 rows out of 1,056 touches about a third
    of the blocks instead of nearly all).
    """
    return _core.fill_holes(np.ascontiguousarray(keep, dtype=np.int64))


@dataclass
class Compaction:
    """What :meth:`HeadKVCacheManager.compact_flat` did: new row ``i`` of table ``r`` (= layer *
    H + head) is old row ``order[offsets[r] + i]`` (int64 [K], offsets int64 [L * H + 1]);
    ``moves[l]``: the row moves the runner must apply to layer ``l``'s cache (layers without
    moves absent)."""

    order: np.ndarray
    offsets: np.ndarray
    moves: dict[int, FlatMoves]

    def rows(self, num_heads: int) -> list[list[np.ndarray]]:
        """order split per [layer][head] (views of it), as :meth:`HeadKVCacheManager.compact`
        takes rows."""
        flat = np.split(self.order, self.offsets[1:-1])
        return [flat[i:i + num_heads] for i in range(0, len(flat), num_heads)]

    def move_list(self) -> list[Move]:
        """moves as ``(layer, dst_block, sources [n, 2])`` tuples, layer by layer."""
        return [(layer, int(fm.dst[i]), fm.pairs[fm.offsets[i]:fm.offsets[i + 1]])
                for layer, fm in self.moves.items() for i in range(len(fm.dst))]


@dataclass
class HeadTable:
    """blocks[l][h]: head-block ids (layer ``l``'s pool); lens: int64 [L, H] cached tokens."""

    blocks: list[list[list[int]]]
    lens: np.ndarray
    num_written: int = 0
    uniform: bool = True  # every (layer, head) holds the same number of tokens and blocks
    maybe_shared: bool = False  # a tail block may be shared with a fork (appends must check)
    positions: list[list[np.ndarray]] | None = None  # [l][h] positions; None = arange(lens)
    evictions: int = 0
    version: int = 0  # changes whenever a block list changes (the runner caches tables by it)
    # whole groups (HeadKVCacheManager): head h of every layer holds block g * H + h for the
    # plain block g = plain[j], so the plain paged graph can run this table (the same cache
    # memory seen as [blocks, H, rows, cols]); valid while plain_version == version
    plain: list[int] | None = None
    plain_version: int = -1

    def plain_table(self) -> list[int] | None:
        """The plain block table of this sequence, or None (a head or a layer holds blocks of
        its own: after an eviction, a fork's copy-on-write, FastKV, or blocks allocated one by
        one when no whole groups were free)."""
        return self.plain if self.plain_version == self.version else None

    def num_blocks(self) -> int:
        if self.uniform:  # every (layer, head) holds as many tokens, hence as many blocks
            return len(self.blocks[0][0]) * self.lens.size
        return sum(len(b) for row in self.blocks for b in row)

    def positions_of(self, layer: int, head: int) -> np.ndarray:
        if self.positions is None:
            return np.arange(int(self.lens[layer, head]), dtype=np.int64)
        return self.positions[layer][head]

    def positions_all(self) -> list[list[np.ndarray]]:
        return [[self.positions_of(layer, h) for h in range(self.lens.shape[1])]
                for layer in range(self.lens.shape[0])]


class HeadKVCacheManager:
    """pools[l]: layer ``l``'s head blocks (``num_blocks * num_kv_heads`` of them)."""

    def __init__(self, pools: list[BlockPool], num_kv_heads: int, block_size: int) -> None:
        """``pools``: one per layer; a :class:`PoolStack` of groups of ``num_kv_heads`` lets
        prompts take whole groups (:attr:`HeadTable.plain`)."""
        self.pools = pools
        self.num_layers = len(pools)
        self.num_kv_heads = num_kv_heads
        self.block_size = block_size
        self.tables: dict[int, HeadTable] = {}
        self.splits: dict[int, SplitPlan] = {}  # FastKV sequences (kept across preemptions)
        self._versions = itertools.count(1)
        self._workspace = _core.CompactionWorkspace()  # compact_flat's buffers, kept

    # ------------------------------------------------------------------ sizes
    def _blocks_for(self, tokens: int | np.ndarray) -> int | np.ndarray:
        return -(-tokens // self.block_size)

    @property
    def num_used(self) -> int:
        """Head blocks in use over all layers."""
        return sum(p.num_used for p in self.pools)

    def table(self, seq_id: int) -> HeadTable:
        t = self.tables.get(seq_id)
        if t is None:
            t = HeadTable(
                blocks=[[[] for _ in range(self.num_kv_heads)] for _ in range(self.num_layers)],
                lens=np.zeros((self.num_layers, self.num_kv_heads), np.int64),
                version=next(self._versions),
            )
            t.plain, t.plain_version = [], t.version
            if seq_id in self.splits:
                t.uniform = False
                t.plain = None
                t.positions = [[np.zeros(0, np.int64) for _ in range(self.num_kv_heads)]
                               for _ in range(self.num_layers)]
            self.tables[seq_id] = t
        return t

    def _growth(self, seq_id: int, t: HeadTable | None, new_tokens: int) -> np.ndarray | None:
        """int64 [L] rows each layer gains for ``new_tokens`` more positions; None when every
        layer gains ``new_tokens`` (no FastKV split in progress)."""
        plan = self.splits.get(seq_id)
        written = 0 if t is None else t.num_written
        if plan is None or written >= plan.prompt_len:
            return None
        grow = np.full(self.num_layers, new_tokens, np.int64)
        grow[plan.first_back_layer:] = (plan.num_propagated
                                        if written + new_tokens >= plan.prompt_len else 0)
        return grow

    def set_positions(self, seq_id: int, first_layer: int, positions: np.ndarray) -> None:
        """Positions of the rows of layers ``>= first_layer`` (every head): the tokens FastKV
        propagated (int64 [n], increasing, ``n`` = those layers' rows)."""
        t = self.tables[seq_id]
        positions = np.asarray(positions, dtype=np.int64)
        if (t.lens[first_layer:] != len(positions)).any():
            raise ValueError(f"set_positions: {len(positions)} positions for rows "
                             f"{sorted(set(t.lens[first_layer:].ravel().tolist()))}")
        t.positions = [row if layer < first_layer else [positions.copy() for _ in row]
                       for layer, row in enumerate(t.positions_all())]

    def blocks_needed(self, seq_id: int, new_tokens: int) -> np.ndarray:
        """int64 [L]: free head blocks each layer's pool must have for ``new_tokens`` more."""
        t = self.tables.get(seq_id)
        grow = self._growth(seq_id, t, new_tokens)
        if grow is not None:
            have = (np.zeros((self.num_layers, self.num_kv_heads), np.int64) if t is None
                    else self._block_counts(t))
            lens = np.zeros_like(have) if t is None else t.lens
            return np.maximum(self._blocks_for(lens + grow[:, None]) - have, 0).sum(axis=1)
        if t is None:
            per_head = self._blocks_for(new_tokens)
            return np.full(self.num_layers, per_head * self.num_kv_heads, np.int64)
        if t.uniform and not t.maybe_shared:
            n = int(t.lens[0, 0])
            need = self._blocks_for(n + new_tokens) - len(t.blocks[0][0])
            return np.full(self.num_layers, max(need, 0) * self.num_kv_heads, np.int64)
        need = self._ragged_need(t, new_tokens)
        return (need + self._shared_tails(t, new_tokens)).sum(axis=1)

    def _block_counts(self, t: HeadTable) -> np.ndarray:
        """int64 [L, H]: head blocks held per (layer, head)."""
        return np.array([[len(b) for b in row] for row in t.blocks], np.int64)

    def _ragged_need(self, t: HeadTable, new_tokens: int | np.ndarray) -> np.ndarray:
        """int64 [L, H]: new blocks per (layer, head) for ``new_tokens`` more rows (an int, or
        int64 [L, 1] per layer)."""
        return np.maximum(self._blocks_for(t.lens + new_tokens) - self._block_counts(t), 0)

    def _shared_tails(self, t: HeadTable, new_tokens: int, always: bool = False) -> np.ndarray:
        """bool [L, H]: partly filled tail blocks shared with a fork (a write copies them);
        checked only if ``t.maybe_shared`` (or ``always``)."""
        out = np.zeros(t.lens.shape, bool)
        if not ((t.maybe_shared or always) and new_tokens):
            return out
        for layer, h in zip(*np.nonzero(t.lens % self.block_size), strict=True):
            blocks = t.blocks[layer][h]
            out[layer, h] = bool(blocks) and self.pools[layer].ref_count(blocks[-1]) > 1
        return out

    def _free_groups(self, n: int) -> np.ndarray | None:
        """int64 [n]: the first ``n`` groups free in every layer's pool, or None (also when
        the pools are not a PoolStack of groups of this manager's heads)."""
        if not isinstance(self.pools, PoolStack) or self.pools[0].group != self.num_kv_heads:
            return None
        return self.pools.first_full_groups(n)

    def can_append(self, seq_id: int, new_tokens: int) -> bool:
        return self.fits(self.blocks_needed(seq_id, new_tokens))

    def growth_block(self) -> np.ndarray:
        """int64 [L]: head blocks one more block of tokens takes in each layer's pool."""
        return np.full(self.num_layers, self.num_kv_heads, np.int64)

    def fits(self, need: np.ndarray) -> bool:
        """Whether every layer's pool has ``need[l]`` free head blocks (int64 [L], a sum of
        :meth:`blocks_needed`)."""
        return all(int(need[i]) <= p.num_free for i, p in enumerate(self.pools))

    # ------------------------------------------------------------------ writes
    def append_slots(self, seq_id: int, new_tokens: int) -> list[tuple[int, int, int]]:
        """Reserve ``new_tokens`` more rows in every (layer, head); return copy-on-write copies
        ``(layer, src, dst)``. Raises NoFreeBlocks (possibly after partial allocation: call
        :meth:`can_append` first)."""
        t = self.table(seq_id)
        copies: list[tuple[int, int, int]] = []
        grow = self._growth(seq_id, t, new_tokens)
        if grow is not None:
            return self._append_split(t, new_tokens, grow)
        if t.uniform and not t.maybe_shared:
            n = int(t.lens[0, 0])
            need = self._blocks_for(n + new_tokens) - len(t.blocks[0][0])
            if need > 0:
                plain = t.plain_table()
                groups = self._free_groups(need) if plain is not None else None
                if groups is not None:  # the same whole groups in every layer
                    got = (groups[:, None] * self.num_kv_heads
                           + np.arange(self.num_kv_heads)).T.tolist()  # [H][need]
                    self.pools.take_groups(groups)
                    for row in t.blocks:
                        for h, blocks in enumerate(row):
                            blocks.extend(got[h])
                else:
                    for layer, pool in enumerate(self.pools):
                        fresh = pool.allocate(need * self.num_kv_heads)
                        for h in range(self.num_kv_heads):
                            t.blocks[layer][h].extend(fresh[h * need:(h + 1) * need])
                t.version = next(self._versions)
                if groups is not None:
                    plain.extend(groups.tolist())
                    t.plain_version = t.version
        else:
            need = self._ragged_need(t, new_tokens)
            cow = self._shared_tails(t, new_tokens)
            for layer, h in zip(*np.nonzero(need + cow), strict=True):
                copies.extend(self._append_one(t, layer, h, int(need[layer, h]),
                                               bool(cow[layer, h])))
            if need.any() or cow.any():
                t.version = next(self._versions)
            if new_tokens:
                t.maybe_shared = False  # every tail is now fresh, copied or was private
        t.lens += new_tokens
        t.num_written += new_tokens
        if t.positions is not None:
            new = np.arange(t.num_written - new_tokens, t.num_written, dtype=np.int64)
            t.positions = [[np.concatenate([p, new]) for p in row] for row in t.positions]
        return copies

    def _append_split(self, t: HeadTable, new_tokens: int,
                      grow: np.ndarray) -> list[tuple[int, int, int]]:
        """append_slots during a FastKV prompt: layers gain ``grow[l]`` rows (front layers the
        new positions; back layers, on the prompt's last step, placeholder rows whose positions
        :meth:`set_positions` sets). A split sequence's blocks are never shared (no fork
        before its prompt is computed)."""
        need = self._ragged_need(t, grow[:, None])
        for layer, h in zip(*np.nonzero(need), strict=True):
            self._append_one(t, layer, h, int(need[layer, h]), False)
        if need.any():
            t.version = next(self._versions)
        new = np.arange(t.num_written, t.num_written + new_tokens, dtype=np.int64)
        t.positions = [[np.concatenate([p, new if g == new_tokens else np.zeros(g, np.int64)])
                        for p in row] for row, g in zip(t.positions_all(), grow, strict=True)]
        t.lens += grow[:, None]
        t.num_written += new_tokens
        t.uniform = False
        return []

    def _append_one(self, t: HeadTable, layer: int, h: int, need: int,
                    cow: bool) -> list[tuple[int, int, int]]:
        """``need`` fresh blocks for (layer, head), plus a private copy of its shared tail."""
        pool, blocks = self.pools[layer], t.blocks[layer][h]
        fresh = pool.allocate(need + int(cow))
        out = []
        if cow:
            src, dst = blocks[-1], fresh.pop()
            pool.free([src])
            blocks[-1] = dst
            out.append((layer, src, dst))
        blocks.extend(fresh)
        return out

    def fork(self, parent: int, child: int) -> None:
        """``child`` shares every head block of ``parent`` (no cache memory is copied)."""
        p = self.tables[parent]
        for layer, pool in enumerate(self.pools):
            for h in range(self.num_kv_heads):
                pool.share(p.blocks[layer][h])
        p.maybe_shared = True
        self.tables[child] = HeadTable(
            blocks=[[list(b) for b in row] for row in p.blocks], lens=p.lens.copy(),
            num_written=p.num_written, uniform=p.uniform, maybe_shared=True,
            positions=None if p.positions is None else [list(r) for r in p.positions],
            evictions=p.evictions, version=next(self._versions),
        )

    def free(self, seq_id: int) -> None:
        t = self.tables.pop(seq_id, None)
        if t is None:
            return
        # head by head within each block: a table of whole groups frees whole groups in order
        # (the next request's allocation finds them together)
        freed = [[b for blocks in itertools.zip_longest(*row) for b in blocks if b is not None]
                 for row in t.blocks]
        if isinstance(self.pools, PoolStack):  # every layer in one pass
            self.pools.free_tables(freed)
        else:
            for pool, blocks in zip(self.pools, freed, strict=True):
                pool.free(blocks)

    # ------------------------------------------------------------------ eviction
    def compact(self, seq_id: int, rows: list[list[np.ndarray]]) -> list[Move]:
        """Keep rows ``rows[l][h]`` of each (l, h) table and drop the rest: new row ``i`` is old
        row ``rows[l][h][i]`` (unique; sorted keeps position order, :func:`fill_holes` moves
        the fewest rows). Kept rows are packed densely from the first block on, emptied blocks
        are freed, shared blocks that would change are replaced by fresh ones (copy-on-write).

        Returns the moves the runner must apply: ``(layer, dst_block, sources)`` with
        ``dst_block`` in the (l, h) pool; the runner reads every source of a layer before it
        writes any destination. Blocks whose rows stay where they are produce no move.
        """
        flat = [np.asarray(r, dtype=np.int64) for row in rows for r in row]
        offsets = np.zeros(len(flat) + 1, np.int64)
        np.cumsum([len(r) for r in flat], out=offsets[1:])
        cat = np.concatenate(flat) if flat else np.zeros(0, np.int64)
        return self.compact_flat(seq_id, cat, offsets).move_list()

    def compact_flat(self, seq_id: int, rows: np.ndarray, offsets: np.ndarray,
                     fill_holes: bool = False) -> Compaction:
        """:meth:`compact` on flat arrays: table ``r`` (= layer * H + head) keeps rows
        ``rows[offsets[r]:offsets[r + 1]]`` (int64 [K], offsets int64 [L * H + 1]), in the new
        row order, or sorted and put in :func:`fill_holes`'s order with ``fill_holes``. The
        bookkeeping (order, positions, moves and their sources) is ``kvcrush::plan_compaction``
        (C++, parallel over tables); only the pool's reference counts, copy-on-write and the
        freed tails stay here. Raises ValueError naming the table for rows that are not unique
        in [0, lens) (or not sorted with ``fill_holes``); nothing changes then."""
        t = self.tables[seq_id]
        heads, bs = self.num_kv_heads, self.block_size
        tables = [b for row in t.blocks for b in row]
        block_offsets = np.zeros(len(tables) + 1, np.int64)
        np.cumsum([len(b) for b in tables], out=block_offsets[1:])
        blocks = np.fromiter(itertools.chain.from_iterable(tables), np.int64,
                             int(block_offsets[-1]))
        positions = (None if t.positions is None
                     else np.concatenate([p for row in t.positions for p in row]))
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        order, new_pos, move_table, move_slot, move_offsets, pairs = self._workspace.plan(
            blocks, block_offsets, np.ascontiguousarray(t.lens.reshape(-1)),
            np.ascontiguousarray(rows, dtype=np.int64), offsets, positions, heads, bs,
            fill_holes)
        kept = np.diff(offsets)
        dst = blocks[block_offsets[move_table] + move_slot]
        shared = np.zeros(len(dst), bool)  # destinations shared with a fork: copy-on-write
        firsts = np.searchsorted(move_table, np.arange(0, len(tables) + 1, heads))
        for layer, pool in enumerate(self.pools):
            a, b = firsts[layer], firsts[layer + 1]
            shared[a:b] = pool.ref_counts(dst[a:b]) > 1
        cow = np.flatnonzero(shared).tolist()
        keep_blocks = self._blocks_for(kept).tolist()
        tails: list[list[int]] = []
        for layer, pool in enumerate(self.pools):  # a layer's copies, then its freed tails
            while cow and move_table[cow[0]] // heads == layer:
                m = cow.pop(0)
                table = tables[move_table[m]]
                (fresh,) = pool.allocate(1)
                pool.free([table[move_slot[m]]])
                table[move_slot[m]] = fresh
                dst[m] = fresh
            freed: list[int] = []
            for table, nb in zip(tables[layer * heads:(layer + 1) * heads],
                                 keep_blocks[layer * heads:(layer + 1) * heads], strict=True):
                if len(table) > nb:
                    freed.extend(table[nb:])
                    del table[nb:]
            tails.append(freed)
        if isinstance(self.pools, PoolStack):  # every layer's tails in one pass
            self.pools.free_tables(tails)
        else:
            for pool, freed in zip(self.pools, tails, strict=True):
                pool.free(freed)
        moves = {}
        for layer in range(self.num_layers):
            a, b = int(firsts[layer]), int(firsts[layer + 1])
            if b > a:
                lo, hi = int(move_offsets[a]), int(move_offsets[b])
                moves[layer] = FlatMoves(dst[a:b], move_offsets[a:b + 1] - lo, pairs[lo:hi])
        t.lens[...] = kept.reshape(t.lens.shape)
        pos = np.split(new_pos, offsets[1:-1])
        t.positions = [pos[i:i + heads] for i in range(0, len(pos), heads)]
        t.uniform = bool((t.lens == t.lens[0, 0]).all())
        # a tail left in place may still be shared with a fork (the sharing side may append)
        t.maybe_shared = t.maybe_shared or bool(self._shared_tails(t, 1, always=True).any())
        t.version = next(self._versions)
        t.evictions += 1
        return Compaction(order, offsets, moves)

    def truncate(self, seq_id: int, num_tokens: int) -> tuple[list[list[np.ndarray]], list[Move]]:
        """Forget every position ``>= num_tokens`` (a chat turn that rewrites the end of the
        conversation); the next write is position ``num_tokens``. Returns the kept rows
        ``[l][h]`` (int64, as :meth:`compact` takes them) and the moves to apply."""
        t = self.tables[seq_id]
        rows = [[np.flatnonzero(t.positions_of(layer, h) < num_tokens)
                 for h in range(self.num_kv_heads)] for layer in range(self.num_layers)]
        evictions = t.evictions
        moves = self.compact(seq_id, rows)
        t.evictions = evictions
        t.num_written = num_tokens
        return rows, moves

    def check_invariants(self) -> None:
        for sid, t in self.tables.items():
            for layer in range(self.num_layers):
                for h in range(self.num_kv_heads):
                    nb, n = len(t.blocks[layer][h]), int(t.lens[layer, h])
                    if nb != self._blocks_for(n):
                        raise AssertionError(f"sequence {sid} layer {layer} head {h}: {nb} "
                                             f"blocks for {n} tokens")
                    if t.positions is not None and len(t.positions[layer][h]) != n:
                        raise AssertionError(f"sequence {sid}: positions out of step")
            if t.uniform and not (t.lens == t.lens[0, 0]).all():
                raise AssertionError(f"sequence {sid}: marked uniform with ragged lengths")
        for layer, pool in enumerate(self.pools):
            pool.check_invariants([t.blocks[layer][h] for t in self.tables.values()
                                   for h in range(self.num_kv_heads)])
