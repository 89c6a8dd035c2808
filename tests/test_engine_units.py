"""Block pool, KV cache manager and scheduler on their own (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from kvcrush_ov.engine.block_pool import BlockPool, NoFreeBlocks
from kvcrush_ov.engine.kv_cache_manager import KVCacheManager
from kvcrush_ov.engine.scheduler import Scheduler
from kvcrush_ov.engine.sequence import Sequence, Status


class FakeSampler:
    def __init__(self) -> None:
        self.output_ids: list[int] = []

    @property
    def num_output(self) -> int:
        return len(self.output_ids)

    def output_slice(self, start: int, end: int) -> list[int]:
        return self.output_ids[start:end]


def seq(i: int, n: int) -> Sequence:
    return Sequence(seq_id=i, prompt_ids=list(range(n)), sampler=FakeSampler())


def scheduler_with(num_blocks: int, budget: int, *lengths: int, **kw):
    """A scheduler over a pool of ``num_blocks`` 4-token blocks, with one waiting sequence per
    prompt length."""
    kv = KVCacheManager(BlockPool(num_blocks), block_size=4)
    s = Scheduler(kv, max_num_batched_tokens=budget, **{"max_num_seqs": 8, **kw})
    seqs = [seq(i, n) for i, n in enumerate(lengths)]
    for x in seqs:
        s.add(x)
    return kv, s, seqs


def test_pool_allocate_share_free():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free == 1 and pool.peak_used == 3
    pool.share(a[:2])
    pool.free(a)
    assert pool.num_free == 2  # a[0], a[1] still held once
    pool.check_invariants([a[:2]])
    pool.free(a[:2])
    assert pool.num_free == 4
    pool.check_invariants([])
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free([a[0]])
    with pytest.raises(NoFreeBlocks):
        pool.allocate(5)


def test_pool_groups_are_taken_whole_and_single_blocks_skip_them():
    pool = BlockPool(12, group=3)
    assert pool.full_groups().tolist() == [True] * 4
    assert pool.allocate(1) == [0]  # group 0 is no longer whole
    assert pool.full_groups().tolist() == [False, True, True, True]
    got = pool.take_groups(np.array([2, 1]))
    assert got.tolist() == [[6, 7, 8], [3, 4, 5]] and pool.num_free == 5
    assert pool.full_groups().tolist() == [False, False, False, True]
    # single blocks come from the free list in order, past the blocks the groups took
    assert pool.allocate(3) == [1, 2, 9]
    pool.check_invariants([[0, 1, 2, 9], got.reshape(-1).tolist()])
    with pytest.raises(AssertionError, match="not free"):
        pool.take_groups(np.array([3]))  # block 9 is held
    pool.free([0, 1, 2])
    assert pool.full_groups().tolist() == [True, False, False, False]
    pool.free(got.reshape(-1).tolist())
    pool.free([9])
    assert pool.num_free == 12 and pool.full_groups().all()
    pool.check_invariants([])
    # a block freed after take_groups took it is on the free list twice: allocated once
    assert sorted(pool.allocate(12)) == list(range(12)) and pool.num_free == 0
    with pytest.raises(ValueError, match="group=5"):
        BlockPool(12, group=5)


def test_pool_stack_frees_every_layers_tables_in_one_pass():
    stack = BlockPool.stacked(3, 8, group=2)
    held = [pool.allocate(4) for pool in stack]  # blocks 0-3 of every layer
    stack[1].share([2])  # a fork holds layer 1's block 2 too
    stack.free_tables([[0, 3], [2, 1], []])
    assert [p.num_free for p in stack] == [6, 5, 4]
    assert stack.full_groups().tolist() == [False, False, True, True]
    assert stack[0].full_groups().tolist() == [False, False, True, True]
    for pool, h in zip(stack, [[1, 2], [0, 3], held[2]], strict=True):
        pool.check_invariants([h, [2]] if pool is stack[1] else [h])
    with pytest.raises(AssertionError, match="block 0 of layer 0 freed twice"):
        stack.free_tables([[0], [], []])
    # the lowest groups free in every layer, found across the growing scan windows
    wide = BlockPool.stacked(2, 2 * 400, group=2)
    wide.take_groups(np.arange(400))
    wide[0].free([140, 141, 600, 601, 700, 701])
    wide[1].free([140, 141, 601, 600])
    assert wide.first_full_groups(2).tolist() == [70, 300]
    assert wide.first_full_groups(3) is None
    assert wide.first_full_groups(2).tolist() == np.flatnonzero(wide.full_groups()).tolist()
    assert sorted(stack[0].allocate(6)) == [0, 3, 4, 5, 6, 7]


def test_invariant_check_catches_a_leak():
    pool = BlockPool(3)
    held = pool.allocate(2)
    with pytest.raises(AssertionError, match="held 0 times, ref 1"):
        pool.check_invariants([held[:1]])


def test_manager_grows_in_blocks():
    kv = KVCacheManager(BlockPool(10), block_size=4)
    assert kv.blocks_needed(0, 9) == 3
    assert kv.append_slots(0, 9) == []
    assert len(kv.tables[0].blocks) == 3 and kv.tables[0].num_cached == 9
    assert kv.blocks_needed(0, 3) == 0  # fills the third block
    kv.append_slots(0, 3)
    assert kv.blocks_needed(0, 1) == 1
    kv.check_invariants()
    kv.free(0)
    assert kv.pool.num_free == 10


def test_fork_shares_blocks_and_copies_on_write():
    kv = KVCacheManager(BlockPool(10), block_size=4)
    kv.append_slots(0, 6)  # blocks [b0 full, b1 half]
    kv.fork(0, 1)
    assert kv.tables[1].blocks == kv.tables[0].blocks
    assert kv.pool.num_free == 8  # the fork holds no extra block
    assert kv.blocks_needed(1, 1) == 1  # writing into the shared half block needs a copy
    copies = kv.append_slots(1, 1)
    (src, dst), = copies
    assert src == kv.tables[0].blocks[1] and dst == kv.tables[1].blocks[1]
    assert kv.tables[1].blocks[0] == kv.tables[0].blocks[0]
    kv.check_invariants()
    kv.free(0)
    kv.free(1)
    kv.pool.check_invariants([])
    assert kv.pool.num_free == 10


def test_scheduler_mixes_prefill_chunks_and_decode():
    kv, s, (a, b) = scheduler_with(100, 10, 3, 25)
    out = s.schedule()
    assert [(c.seq.seq_id, c.start, c.num_tokens, c.sample) for c in out.chunks] == [
        (0, 0, 3, True), (1, 0, 7, False)]
    a.sampler.output_ids.append(42)  # a sampled a token: one to decode next
    out = s.schedule()
    assert [(c.seq.seq_id, c.start, c.num_tokens, c.sample) for c in out.chunks] == [
        (0, 3, 1, True), (1, 7, 9, False)]
    kv.check_invariants()


def test_u4_prompt_chunks_end_on_block_boundaries_whatever_the_batch():
    """With align_chunks (u4 caches), a chunk that stops short of the prompt's end ends on a
    block boundary, alone or next to others; a sliver of a step smaller than a block is left
    unused, and the prompt's last chunk may end anywhere."""
    def cuts_of(seq_id, *lengths, budget=10, align=True):
        kv = KVCacheManager(BlockPool(100), block_size=4)
        s = Scheduler(kv, max_num_batched_tokens=budget, max_num_seqs=8, align_chunks=align)
        seqs = [seq(i, n) for i, n in enumerate(lengths)]
        for x in seqs:
            s.add(x)
        cuts = []
        while any(x.num_computed < len(x.prompt_ids) for x in seqs):
            for c in s.schedule().chunks:
                if c.seq.seq_id == seq_id:
                    cuts.append(c.start + c.num_tokens)
        return cuts

    assert cuts_of(0, 25) == [8, 16, 25]
    assert cuts_of(1, 3, 25) == [4, 12, 20, 25]
    assert all(c % 4 == 0 for c in cuts_of(2, 5, 6, 25, 7)[:-1])
    assert cuts_of(1, 9, 9) == [9]  # 1 token left after a's 9: b waits for the next step
    assert cuts_of(1, 9, 9, align=False) == [1, 9]  # u8 and wider: GenAI's packing
    assert cuts_of(0, 9, budget=3) == [3, 6, 9]  # a step smaller than a block cannot align


def test_scheduler_respects_max_num_seqs():
    _, s, _ = scheduler_with(100, 100, 5, 5, 5, max_num_seqs=2)
    out = s.schedule()
    assert [c.seq.seq_id for c in out.chunks] == [0, 1]
    assert len(s.waiting) == 1


def test_without_split_fuse_a_prompt_runs_whole():
    _, s, _ = scheduler_with(100, 10, 6, 6, dynamic_split_fuse=False)
    out = s.schedule()
    assert [c.num_tokens for c in out.chunks] == [6]


def test_preemption_frees_the_newest_and_recomputes_it():
    kv, s, (a, b) = scheduler_with(5, 100, 8, 7)
    s.schedule()  # both prefilled: 4 blocks used (b fit with one block of growth to spare)
    for _ in range(2):
        a.sampler.output_ids.append(1)
        b.sampler.output_ids.append(1)
        out = s.schedule()  # 1st: a takes the last block; 2nd: b needs a 3rd, none is free
    assert out.preempted == [b] and b.status is Status.WAITING and b.num_computed == 0
    assert [c.seq.seq_id for c in out.chunks] == [0]
    kv.check_invariants()
    s.finish(a)
    out = s.schedule()  # b comes back and recomputes prompt + its generated tokens
    assert [(c.seq.seq_id, c.start, c.num_tokens, c.sample) for c in out.chunks] == [
        (1, 0, 9, True)]
    kv.check_invariants()


def test_admission_watermark_waits_for_room_for_the_whole_prompt():
    """b's first chunk fits, but not its whole prompt next to a's growth: it waits (chunk by
    chunk it would be preempted later); alone in the engine a prompt joins on its first chunk."""
    kv, s, (a, b) = scheduler_with(7, 4, 8, 12)
    s.schedule()
    s.schedule()  # a prefilled in 2 chunks of 4
    a.sampler.output_ids.append(1)
    out = s.schedule()  # a's 9th token takes a 3rd block; b needs 3 + 1 of a's growth = 4 free
    assert [c.seq.seq_id for c in out.chunks] == [0, 1]
    kv2, s2, (c, d) = scheduler_with(6, 4, 8, 12)
    s2.schedule()
    s2.schedule()
    c.sampler.output_ids.append(1)
    out = s2.schedule()  # 3 free: d's first chunk (1 block) fits, the whole prompt does not
    assert [x.seq.seq_id for x in out.chunks] == [0] and list(s2.waiting) == [d]
    s2.finish(c)
    out = s2.schedule()
    assert [(x.seq.seq_id, x.num_tokens) for x in out.chunks] == [(1, 4)]
    kv2.check_invariants()
    _, s3, _ = scheduler_with(2, 4, 16)  # alone: joins although 16 tokens need 4 blocks
    assert [x.num_tokens for x in s3.schedule().chunks] == [4]


def test_token_slice_equals_all_ids_slices():
    s = seq(0, 5)
    s.sampler.output_ids.extend([50, 51, 52])
    for start in range(9):
        for end in range(start, 9):
            assert s.token_slice(start, end) == s.all_ids[start:end]


# -- per-(layer, head) cache manager ------------------------------------------------------------

def head_manager(num_blocks: int = 40, layers: int = 2, heads: int = 2):
    from kvcrush_ov.engine.head_cache_manager import HeadKVCacheManager

    return HeadKVCacheManager([BlockPool(num_blocks) for _ in range(layers)], heads, block_size=4)


def test_head_tables_take_whole_groups_and_stay_plain_until_changed():
    from kvcrush_ov.engine.head_cache_manager import HeadKVCacheManager

    heads, layers = 2, 3
    kv = HeadKVCacheManager(BlockPool.stacked(layers, 20 * heads, group=heads), heads,
                            block_size=4)
    kv.append_slots(0, 6)  # 2 blocks
    kv.append_slots(1, 3)  # 1 block
    kv.append_slots(0, 3)  # one more
    t0, t1 = kv.tables[0], kv.tables[1]
    assert t0.plain_table() == [0, 1, 3] and t1.plain_table() == [2]
    for t in (t0, t1):  # head h of plain block g is head block g * H + h, in every layer
        assert all(t.blocks[layer][h] == [g * heads + h for g in t.plain_table()]
                   for layer in range(layers) for h in range(heads))
    kv.append_slots(1, 1)  # no new block: still plain
    assert t1.plain_table() == [2]
    kv.compact(1, [[np.arange(3), np.arange(4)] for _ in range(layers)])
    assert t1.plain_table() is None  # heads hold their own blocks now
    kv.fork(0, 2)
    assert kv.tables[2].plain_table() is None and t0.plain_table() == [0, 1, 3]
    kv.check_invariants()
    kv.free(2)
    kv.free(1)
    # a layer whose pool has no whole group free: blocks one by one, not plain
    pool = kv.pools[1]
    held = pool.allocate(pool.num_free)
    spare = [b for b in held if b % heads == 0][:3]  # one block of three groups
    pool.free(spare)
    assert not pool.full_groups().any()
    kv.append_slots(3, 4)
    assert kv.tables[3].plain_table() is None
    assert all(len(b) == 1 for row in kv.tables[3].blocks for b in row)
    pool.free([b for b in held if b not in spare])
    kv.check_invariants()


def test_head_fork_copies_a_shared_tail_once_per_side():
    kv = head_manager()
    kv.append_slots(0, 6)  # 2 blocks per (layer, head), the second half full
    kv.fork(0, 1)
    copies = kv.append_slots(1, 1)  # the child writes into the shared tail: 4 private copies
    assert len(copies) == 4 and all(src != dst for _, src, dst in copies)
    assert kv.append_slots(0, 1) == []  # the parent's tail is its own again
    assert kv.append_slots(1, 1) == []
    assert not kv.tables[0].maybe_shared and not kv.tables[1].maybe_shared
    kv.check_invariants()


def test_head_ragged_append_allocates_per_head_and_copies_shared_tails():
    kv = head_manager()
    kv.append_slots(0, 8)
    keep = [[np.arange(3), np.arange(6)], [np.arange(5), np.arange(8)]]
    kv.compact(0, keep)  # lens [[3, 6], [5, 8]]: ragged, nothing moves
    t = kv.tables[0]
    assert not t.uniform and t.lens.tolist() == [[3, 6], [5, 8]]
    assert kv.blocks_needed(0, 1).tolist() == [0, 1]  # only (1, 1) is full
    kv.fork(0, 1)
    assert kv.blocks_needed(1, 1).tolist() == [2, 2]  # 3 shared partial tails + (1, 1)'s block
    copies = kv.append_slots(1, 1)
    assert sorted(layer for layer, _, _ in copies) == [0, 0, 1]  # the 3 partial tails
    assert kv.tables[1].lens.tolist() == [[4, 7], [6, 9]]
    assert [len(b) for row in kv.tables[1].blocks for b in row] == [1, 2, 2, 3]
    kv.check_invariants()


def test_fill_holes_moves_only_the_kept_rows_past_the_new_end():
    from kvcrush_ov.engine.head_cache_manager import fill_holes

    assert fill_holes(np.array([0, 2, 3, 5, 7])).tolist() == [0, 5, 2, 3, 7]
    assert fill_holes(np.arange(6)).tolist() == list(range(6))  # nothing dropped
    assert fill_holes(np.array([4, 5, 6])).tolist() == [4, 5, 6]  # every row a filler
    assert fill_holes(np.array([], dtype=np.int64)).tolist() == []


def test_head_compaction_with_filled_holes_rewrites_only_the_blocks_with_holes():
    from kvcrush_ov.engine.head_cache_manager import fill_holes

    kv = head_manager(layers=1, heads=1)
    kv.append_slots(0, 16)  # rows 0..15 in blocks 0..3 (block size 4)
    t = kv.tables[0]
    blocks = list(t.blocks[0][0])
    keep = np.array([r for r in range(16) if r not in (1, 9)])
    ordered = head_manager(layers=1, heads=1)
    ordered.append_slots(0, 16)
    moves_sorted = ordered.compact(0, [[keep]])  # position order: every block from the hole on
    assert [dst for _, dst, _ in moves_sorted] == ordered.tables[0].blocks[0][0]
    order = fill_holes(keep)  # rows 14, 15 fill the holes 1, 9
    assert order.tolist() == [0, 14, 2, 3, 4, 5, 6, 7, 8, 15, 10, 11, 12, 13]
    moves = kv.compact(0, [[order]])
    assert [(dst, src.tolist()) for _, dst, src in moves] == [
        (blocks[0], [[blocks[0], 0], [blocks[3], 2], [blocks[0], 2], [blocks[0], 3]]),
        (blocks[2], [[blocks[2], 0], [blocks[3], 3], [blocks[2], 2], [blocks[2], 3]]),
    ]
    assert t.lens.tolist() == [[14]] and t.blocks[0][0] == blocks
    assert t.positions_of(0, 0).tolist() == order.tolist()  # rows now out of position order
    kv.append_slots(0, 1)  # a new token goes after the last row
    assert t.positions_of(0, 0).tolist() == [*order.tolist(), 16]
    with pytest.raises(ValueError, match="unique"):
        kv.compact(0, [[np.array([0, 0, 1])]])
    kv.check_invariants()


def test_head_compaction_leaving_a_shared_tail_marks_it():
    kv = head_manager(layers=1, heads=1)
    kv.append_slots(0, 8)
    kv.fork(0, 1)
    kv.append_slots(0, 4)
    kv.append_slots(1, 4)  # both appended: neither tail is shared any more
    assert not kv.tables[1].maybe_shared
    kv.compact(1, [[np.arange(6)]])  # keeps rows 0..5 in place: its tail is the parent's block 1
    assert kv.tables[1].maybe_shared
    assert len(kv.append_slots(1, 1)) == 1  # so the next write copies it
    kv.check_invariants()


def _ref_fill_holes(keep: np.ndarray) -> np.ndarray:
    """The former numpy fill_holes (the reference of kvcrush::fill_holes)."""
    k = len(keep)
    stay = int(np.searchsorted(keep, k))
    order = np.arange(k, dtype=np.int64)
    if stay < k:
        hole = np.ones(k, bool)
        hole[keep[:stay]] = False
        order[hole] = keep[stay:]
    return order


def _ref_compact(kv, seq_id: int, rows: list[list[np.ndarray]]) -> list:
    """The former pure-Python HeadKVCacheManager.compact (block lists, copy-on-write, moves,
    positions), the reference of compact_flat / kvcrush::plan_compaction."""
    t, bs, moves = kv.tables[seq_id], kv.block_size, []
    positions = t.positions_all()
    for layer, pool in enumerate(kv.pools):
        for h in range(kv.num_kv_heads):
            order, blocks = np.asarray(rows[layer][h], dtype=np.int64), t.blocks[layer][h]
            k = len(order)
            old = np.asarray(blocks, dtype=np.int64)
            src = np.stack([old[order // bs], order % bs], axis=1)
            for i in dict.fromkeys((np.flatnonzero(order != np.arange(k)) // bs).tolist()):
                dst = blocks[i]
                if pool.ref_count(dst) > 1:
                    (dst,) = pool.allocate(1)
                    pool.free([blocks[i]])
                    blocks[i] = dst
                moves.append((layer, dst, src[i * bs:(i + 1) * bs].tolist()))
            nb = -(-k // bs)
            pool.free(blocks[nb:])
            del blocks[nb:]
            t.lens[layer, h] = k
            positions[layer][h] = positions[layer][h][order]
    t.positions = positions
    t.uniform = bool((t.lens == t.lens[0, 0]).all())
    t.maybe_shared = t.maybe_shared or bool(kv._shared_tails(t, 1, always=True).any())
    return moves


def test_compact_flat_matches_the_python_reference_with_forks_and_filled_holes():
    """Random ragged evictions, some on a forked (shared) table, twice in a row: compact_flat
    (C++ bookkeeping, fill_holes in C++) leaves the same tables, pools and moves as the
    reference, and check_invariants holds."""
    from kvcrush_ov.engine.head_cache_manager import fill_holes

    rng = np.random.default_rng(3)
    for trial in range(30):
        kvs = [head_manager(num_blocks=120, layers=2, heads=3) for _ in range(2)]
        for kv in kvs:
            kv.append_slots(0, 21)
            if trial % 2:
                kv.fork(0, 1)
        for _ in range(2):
            t = kvs[0].tables[0]
            keep = [[np.sort(rng.choice(int(n), int(rng.integers(0, n + 1)), replace=False))
                     for n in row] for row in t.lens]
            for r in (k for row in keep for k in row):
                np.testing.assert_array_equal(fill_holes(r), _ref_fill_holes(r))
            want = _ref_compact(kvs[1], 0, [[_ref_fill_holes(r) for r in row] for row in keep])
            flat = [r for row in keep for r in row]
            offsets = np.concatenate([[0], np.cumsum([len(r) for r in flat])]).astype(np.int64)
            done = kvs[0].compact_flat(0, np.concatenate(flat).astype(np.int64), offsets,
                                       fill_holes=True)
            got = [(m[0], m[1], m[2].tolist()) for m in done.move_list()]
            assert got == [(m[0], int(m[1]), m[2]) for m in want]
            a, b = kvs[0].tables[0], kvs[1].tables[0]
            assert a.blocks == b.blocks and a.lens.tolist() == b.lens.tolist()
            assert (a.uniform, a.maybe_shared) == (b.uniform, b.maybe_shared)
            assert [p.tolist() for row in a.positions for p in row] == \
                [p.tolist() for row in b.positions for p in row]
            assert [list(p._free) for p in kvs[0].pools] == [list(p._free) for p in kvs[1].pools]
            for kv in kvs:
                kv.check_invariants()
            kvs[0].append_slots(0, 3)
            kvs[1].append_slots(0, 3)


def test_compact_flat_rejects_bad_rows_naming_the_table_and_changes_nothing():
    kv = head_manager(layers=2, heads=2)
    kv.append_slots(0, 8)
    t = kv.tables[0]
    blocks = [list(b) for row in t.blocks for b in row]
    rows = np.array([0, 1, 0, 1, 0, 1, 5, 2], np.int64)  # table 3 (layer 1 head 1) unsorted
    offsets = np.array([0, 2, 4, 6, 8], np.int64)
    with pytest.raises(ValueError, match="layer 1 head 1 must be sorted"):
        kv.compact_flat(0, rows, offsets, fill_holes=True)
    with pytest.raises(ValueError, match="layer 0 head 1 must be unique"):
        kv.compact_flat(0, np.array([0, 1, 3, 3, 0, 1, 2, 5], np.int64), offsets)
    with pytest.raises(ValueError, match="layer 0 head 0 must be unique, in \\[0, 8\\)"):
        kv.compact_flat(0, np.array([0, 8, 0, 1, 0, 1, 2, 5], np.int64), offsets)
    assert [list(b) for row in t.blocks for b in row] == blocks and (t.lens == 8).all()
    kv.check_invariants()


def test_scores_compact_flat_matches_compact():
    """SequenceScores.compact_flat (one gather, the evictor's path) == compact per head, rows
    never scored (past a head's accumulated scores) getting 0; bad offsets raise."""
    from kvcrush_ov.eviction.scores import SequenceScores

    rng = np.random.default_rng(4)
    a, b = SequenceScores(2, 3), SequenceScores(2, 3)
    for layer in range(2):
        for h in range(3):
            seg = rng.random(int(rng.integers(5, 20))).astype(np.float32)
            a.add(layer, h, seg)
            b.add(layer, h, seg)
    rows = [[rng.permutation(25)[:int(rng.integers(0, 25))] for _ in range(3)]
            for _ in range(2)]
    flat = [r for row in rows for r in row]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in flat])]).astype(np.int64)
    a.compact(rows)
    b.compact_flat(np.concatenate(flat).astype(np.int64), offsets)
    for layer in range(2):
        for h in range(3):
            np.testing.assert_array_equal(a.acc[layer][h], b.acc[layer][h])
    with pytest.raises(ValueError, match="offsets"):
        b.compact_flat(np.zeros(0, np.int64), np.zeros(3, np.int64))
    from kvcrush_ov import _core  # the C++ gather behind it refuses what it cannot read

    one = [np.ones(3, np.float32)]
    with pytest.raises(ValueError, match="negative row"):
        _core.gather_rows(one, np.array([-1], np.int64), np.array([0, 1], np.int64))
    with pytest.raises(ValueError, match="offsets"):
        _core.gather_rows(one + one, np.zeros(2, np.int64), np.array([0, 2, 1], np.int64))


def test_a_request_the_whole_cache_cannot_hold_fails_instead_of_restarting_forever():
    """Alone in the engine and out of blocks, a sequence would be preempted, recomputed and
    preempted again at the same point without end: the step raises CacheFullError instead.
    (Admission refuses such requests up front; this guards its estimate.)"""
    from kvcrush_ov.errors import CacheFullError

    kv, s, (a,) = scheduler_with(4, 8, 20)  # 16 tokens of cache, a 20-token prompt
    s.schedule()
    s.schedule()  # 16 tokens: every block
    with pytest.raises(CacheFullError, match="sequence 0 needs room for 4 more tokens after 16"):
        s.schedule()
    assert a.num_computed == 16 and a.num_preemptions == 0
    kv2, s2, (b, c) = scheduler_with(5, 100, 8, 7)  # two requests: the newest is preempted
    s2.schedule()
    for _ in range(2):
        b.sampler.output_ids.append(1)
        c.sampler.output_ids.append(1)
        out = s2.schedule()
    assert out.preempted == [c]


class _Recorder:
    """Stands in for an ov.InferRequest: records set_tensor calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.tensors: dict[str, object] = {}

    def set_tensor(self, name: str, tensor: object) -> None:
        self.calls.append(name)
        self.tensors[name] = tensor


def test_table_buffers_bind_once_and_rewrite_in_place():
    from kvcrush_ov.engine.head_model_runner import TableBuffers

    req = _Recorder()
    bufs = TableBuffers(num_layers=3)
    begins = np.array([[0, 2, 5], [0, 1, 3]])
    bufs.write(req, range(1, 3), [[4, 5, 6, 7, 8], [9, 10, 11]], begins)
    assert sorted(req.calls) == ["block_indices.1", "block_indices.2",
                                 "block_indices_begins.1", "block_indices_begins.2"]
    view = req.tensors["block_indices.1"].data
    assert view[:5].tolist() == [4, 5, 6, 7, 8] and len(view) >= 5
    req.calls.clear()
    # shorter tables (an eviction): written into the bound buffers, no set_tensor call
    bufs.write(req, range(1, 3), [[3, 2], [1]], np.array([[0, 1, 2], [0, 1, 1]]))
    assert req.calls == []
    assert req.tensors["block_indices.1"].data[:2].tolist() == [3, 2]
    assert req.tensors["block_indices_begins.2"].data.tolist() == [0, 1, 1]
    # a layer never bound before is bound; then tables beyond the capacity rebind every layer
    bufs.write(req, range(0, 1), [[1]], np.array([[0, 1, 1]]))
    assert sorted(req.calls) == ["block_indices.0", "block_indices_begins.0"]
    req.calls.clear()
    big = list(range(100))
    bufs.write(req, range(0, 3), [big, big, big], np.array([[0, 50, 100]] * 3))
    assert len(req.calls) == 6
    assert req.tensors["block_indices.2"].data[:100].tolist() == big
    # another number of subsequences rebinds the begins (and indices) of the written layers
    req.calls.clear()
    bufs.write(req, range(0, 1), [[7]], np.array([[0, 1]]))
    assert sorted(req.calls) == ["block_indices.0", "block_indices_begins.0"]
    assert req.tensors["block_indices_begins.0"].data.tolist() == [0, 1]
