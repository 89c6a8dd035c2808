"""KV-cache compaction in the C++ core (``CacheLayout.compact`` -> ``kvcrush::compact_blocks``)
against a pure-numpy reference written here (the formulas of kv_codec's module docstring), bit
for bit, for every precision, random moves (single- and multi-source, in place, empty
destinations), with and without ``lossless_single_source``."""

from __future__ import annotations

import numpy as np
import pytest

from kvcrush_ov.engine.kv_codec import CacheLayout, Move, compact_kv, flatten_moves

F32 = np.float32
BS = 8  # block size of these tests (any size works)


def layouts(precision: str, d: int = 16) -> tuple[CacheLayout, CacheLayout]:
    extra = {"u8": 8, "u4": 16}.get(precision, 0)
    key = CacheLayout.from_shape("key", precision, BS + extra, d)
    value = CacheLayout.from_shape("value", precision, BS, d + extra)
    return key, value


def random_pool(layout: CacheLayout, nb: int, heads: int, rng: np.random.Generator
                ) -> np.ndarray:
    """u8 [nb, heads, head_block_bytes] of random rows; by-channel headers hold sane scales."""
    pool = rng.integers(0, 256, size=(nb, heads, layout.head_block_bytes), dtype=np.uint8)
    if layout.by_channel:
        d = layout.head_dim
        scale = rng.uniform(0.001, 0.1, size=(nb, heads, d)).astype(F32)
        zp = rng.uniform(0, layout.native.levels, size=(nb, heads, d)).astype(F32)
        pool[:, :, :8 * d] = np.concatenate([scale, zp], -1).view(np.uint8)
    return pool


# --- the reference ---

def ref_codes(layout: CacheLayout, block: np.ndarray, row: int) -> np.ndarray:
    codes = block[layout.header_bytes + row * layout.row_bytes:][:layout.row_bytes]
    if layout.precision == "u4":
        out = np.empty(2 * len(codes), np.uint8)
        out[0::2], out[1::2] = codes >> 4, codes & 0x0F
        return out
    return codes


def ref_decode(layout: CacheLayout, block: np.ndarray, row: int) -> np.ndarray:
    d = layout.head_dim
    hdr = block[:8 * d].copy().view(F32)
    return (ref_codes(layout, block, row).astype(F32) - hdr[d:]) * hdr[:d]


def ref_encode(layout: CacheLayout, x: np.ndarray) -> np.ndarray:
    """x f32 [n, D] -> one by-channel key head-block (numpy, f32 / f64 as documented)."""
    levels = 15 if layout.precision == "u4" else 255
    out = np.zeros(layout.head_block_bytes, np.uint8)
    if not len(x):
        return out
    lo, hi = x.min(axis=0), x.max(axis=0)
    scale = ((hi - lo) * F32(1.0 / levels)).astype(F32)
    scale[scale == 0] = F32(0.0001)
    zp = (-lo / scale).astype(F32)
    inv = (F32(1.0) / scale).astype(F32)
    t = (x.astype(np.float64) * inv.astype(np.float64) + zp.astype(np.float64)).astype(F32)
    q = np.clip(np.rint(t), 0, levels).astype(np.uint8)
    if layout.precision == "u4":
        q = ((q[:, 0::2] << 4) | q[:, 1::2]).astype(np.uint8)
    out[:8 * layout.head_dim] = np.concatenate([scale, zp]).view(np.uint8)
    body = out[layout.header_bytes:].reshape(layout.block_size, layout.row_bytes)
    body[:len(x)] = q
    return out


def ref_compact(layout: CacheLayout, pool: np.ndarray, head: int, moves: list[Move],
                lossless: bool) -> np.ndarray:
    before, after = pool[:, head].copy(), pool.copy()
    hb, rb = layout.header_bytes, layout.row_bytes
    for dst, sources in moves:
        new = np.zeros(layout.head_block_bytes, np.uint8)
        blocks = {b for b, _ in sources}
        if sources and (not layout.by_channel or (lossless and len(blocks) == 1)):
            new[:hb] = before[sources[0][0], :hb]
            for i, (b, r) in enumerate(sources):
                new[hb + i * rb:hb + (i + 1) * rb] = before[b, hb + r * rb:hb + (r + 1) * rb]
        elif sources:
            new = ref_encode(layout, np.stack([ref_decode(layout, before[b], r)
                                               for b, r in sources]))
        after[dst, head] = new
    return after


def random_moves(rng: np.random.Generator, nb: int, max_dst: int) -> list[Move]:
    dsts = rng.choice(nb, size=rng.integers(1, min(max_dst, nb) + 1), replace=False)
    moves: list[Move] = []
    for dst in dsts:
        n = int(rng.integers(0, BS + 1))
        if rng.random() < 0.3:  # one source block
            b = int(rng.integers(0, nb))
            rows = rng.choice(BS, size=n, replace=False)
            moves.append((int(dst), [(b, int(r)) for r in rows]))
        else:
            moves.append((int(dst), [(int(rng.integers(0, nb)), int(rng.integers(0, BS)))
                                     for _ in range(n)]))
    return moves


@pytest.mark.parametrize("precision", ["u8", "u4", "bf16", "f16", "f32"])
@pytest.mark.parametrize("lossless", [True, False])
def test_compaction_matches_the_reference(precision: str, lossless: bool) -> None:
    rng = np.random.default_rng(len(precision) + lossless)
    key, value = layouts(precision)
    for trial in range(25):
        nb, heads = int(rng.integers(2, 12)), int(rng.integers(1, 4))
        for layout in (key, value):
            pool = random_pool(layout, nb, heads, rng)
            head = int(rng.integers(0, heads))
            moves = random_moves(rng, nb, max_dst=nb if trial % 2 else 3)
            want = ref_compact(layout, pool, head, moves, lossless)
            cache = pool.reshape(nb, heads * layout.head_block_bytes) if heads > 1 else pool
            layout.compact(cache, moves, head=head if heads > 1 else None,
                           lossless_single_source=lossless)
            np.testing.assert_array_equal(pool, want, err_msg=f"{layout} {moves}")


def test_compact_kv_on_many_threads() -> None:
    """Large enough for several threads: one SmolLM2-like layer, 4096 -> 1024 tokens."""
    rng = np.random.default_rng(9)
    key, value = layouts("u8", d=64)
    heads, bs = 3, BS
    nb = 4096 // bs * heads
    keys, values = random_pool(key, nb, 1, rng), random_pool(value, nb, 1, rng)
    moves: list[Move] = []
    for h in range(heads):
        kept = np.sort(rng.choice(4096, size=1024, replace=False))
        for i in range(0, 1024, bs):
            moves.append(((i // bs) * heads + h,
                          [(int(t // bs) * heads + h, int(t % bs)) for t in kept[i:i + bs]]))
    want_k = ref_compact(key, keys, 0, moves, True)
    want_v = ref_compact(value, values, 0, moves, True)
    compact_kv(key, value, keys, values, moves)
    np.testing.assert_array_equal(keys, want_k)
    np.testing.assert_array_equal(values, want_v)


def test_encode_and_decode_match_the_reference() -> None:
    rng = np.random.default_rng(4)
    for precision in ("u8", "u4"):
        key, _ = layouts(precision)
        for n in (0, 1, 5, BS):
            x = rng.normal(size=(n, key.head_dim)).astype(F32)
            x[:, 3] = 1.5  # a constant channel: scale 0.0001
            enc = key.encode_block(x)
            np.testing.assert_array_equal(enc, ref_encode(key, x))
            got = key.dequantize_rows(enc, np.arange(n))
            want = np.stack([ref_decode(key, enc, r) for r in range(n)]) if n else got
            np.testing.assert_array_equal(got, want)


def test_invalid_moves_write_nothing() -> None:
    key, _ = layouts("u8")
    pool = random_pool(key, 4, 1, np.random.default_rng(0))
    before = pool.copy()
    with pytest.raises(IndexError, match="source row 8 outside 0..7"):
        key.compact(pool, [(0, [(1, 0)]), (2, [(1, 8)])])
    with pytest.raises(ValueError, match="distinct"):
        key.compact(pool, [(0, [(1, 0)]), (0, [(2, 0)])])
    with pytest.raises(IndexError, match="block index -1"):
        key.compact(pool, [(-1, [(1, 0)])])
    np.testing.assert_array_equal(pool, before)
    pool.flags.writeable = False
    with pytest.raises(TypeError):  # never a silent copy, whose writes would be lost
        key.compact(pool, [(0, [(1, 0)])])


@pytest.mark.parametrize("precision", ["u8", "u4", "bf16", "f32"])
def test_compact_many_matches_the_reference_cache_by_cache(precision: str) -> None:
    """_core.CacheCompactor (kvcrush::compact_many: every cache of an event in one pass) gives
    each cache what the reference gives it alone; its buffer is reused across calls."""
    from kvcrush_ov import _core

    rng = np.random.default_rng(11 + len(precision))
    key, value = layouts(precision)
    compactor = _core.CacheCompactor()
    for _ in range(6):
        nb, heads = int(rng.integers(2, 12)), int(rng.integers(1, 4))
        pools, wants, args = [], [], ([], [], [], [], [], [])
        for layout in (key, value, key):
            pool = random_pool(layout, nb, heads, rng)
            head = int(rng.integers(0, heads))
            moves = random_moves(rng, nb, max_dst=nb)
            wants.append(ref_compact(layout, pool, head, moves, True))
            pools.append(pool)
            flat = flatten_moves(moves)
            for lst, v in zip(args, (pool, head, layout.native, flat.dst, flat.offsets,
                                     flat.pairs), strict=True):
                lst.append(v)
        compactor.compact(*args, True)
        for pool, want in zip(pools, wants, strict=True):
            np.testing.assert_array_equal(pool, want)


def test_compact_many_validates_every_job_before_writing() -> None:
    from kvcrush_ov import _core

    rng = np.random.default_rng(5)
    key, _ = layouts("u8")
    a, b = random_pool(key, 4, 1, rng), random_pool(key, 4, 1, rng)
    before = a.copy()
    ok = flatten_moves([(0, [(1, 0), (2, 3)])])
    bad = flatten_moves([(7, [(1, 0)])])  # destination block outside the cache
    with pytest.raises(IndexError, match="job 1"):
        _core.CacheCompactor().compact([a, b], [0, 0], [key.native] * 2, [ok.dst, bad.dst],
                                       [ok.offsets, bad.offsets], [ok.pairs, bad.pairs], True)
    np.testing.assert_array_equal(a, before)  # job 0 untouched: nothing written
    with pytest.raises(ValueError, match="heads, layouts"):
        _core.CacheCompactor().compact([a], [0, 0], [key.native], [ok.dst], [ok.offsets],
                                       [ok.pairs], True)
