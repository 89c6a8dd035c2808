"""Byte-exact codec for the CPU plugin's paged KV-cache blocks (OpenVINO 2026.4.1).

Layouts of ONE head-block (one KV head of one block; ``bs`` = block size (32), ``D`` = head
size, all floats little-endian f32). Verified against the plugin (tests/test_kv_codec.py):

``u8`` keys, stored ``[bs + 8, D]`` u8, quantized per channel (column) over the block's tokens:

    bytes [0, 4D)          scale[D]  f32
    bytes [4D, 8D)         zp[D]     f32
    bytes [8D + t*D + c]   code of token t, channel c

``u4`` keys (``KEY_CACHE_PRECISION=u4``), stored ``[bs + 16, D]`` u4 (``D/2`` bytes per row):
the same 8D-byte header, then token rows of ``D/2`` bytes; channel ``2i`` is the HIGH nibble and
``2i + 1`` the LOW nibble of byte ``i``.

``u8`` values, stored ``[bs, D + 8]`` u8, quantized per token: row ``t`` is
``scale f32 | zp f32 | D codes``.

``bf16`` / ``f16`` / ``f32``: ``[bs, D]``, one token per row.

Formulas (f32 arithmetic, as the plugin's AVX2/AVX-512 kernels):

- dequantize: ``x = (q - zp) * scale``;
- by-channel keys over the block's ``n`` valid rows: ``scale = (max - min) * (1.0f / L)``
  (``L`` = 255 for u8, 15 for u4; a zero scale becomes ``0.0001``), ``zp = -min / scale``,
  ``q = clamp(rint(fma(x, 1.0f / scale, zp)), 0, L)`` (round half to even);
- per-token values: ``scale = (max - min) / 255`` (a division), the rest as for keys.

Plugin behaviour this codec relies on (measured): rows beyond a block's valid count are never
written or read by the plugin. Appending tokens to a key block holding ``m`` valid rows
dequantizes those ``m`` rows to f32, appends the new keys and re-quantizes all ``m + k`` rows with
fresh per-channel scales (so every decode step into a partial block re-quantizes it); values are
written per token and never touched again. A compacted block that follows this layout is
therefore appended to correctly.

Compaction: keys whose destination block draws all its rows from ONE source block are copied
with that block's scale / zero point (lossless); rows gathered from several source blocks are
dequantized and re-quantized with the formula above (exactly what the plugin would do to those
f32 values). Values and unquantized formats are copied row by row (lossless).

The by-channel key codec and the compaction run in the C++ core (cpp/src/compaction.cpp,
``kvcrush_ov._core``; parallel over destination blocks); this module keeps the layouts, the
per-token value encoder and the Python API.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import openvino as ov

from kvcrush_ov import _core

KEY = "key"
VALUE = "value"
QUANTIZED = ("u8", "u4")
PLAIN = ("bf16", "f16", "f32")
_HEADER_BYTES = 8  # scale f32 + zero point f32, per channel (keys) or per token (values)
_F32 = np.float32
# (destination block, [(source block, source row), ...]) with rows in their new order
Move = tuple[int, Sequence[tuple[int, int]] | np.ndarray]


def _bits(precision: str) -> int:
    return 4 if precision == "u4" else 8 if precision == "u8" else 16 if precision != "f32" else 32


def _levels(precision: str) -> int:
    return 15 if precision == "u4" else 255


def _fma_f32(x: np.ndarray, mul: np.ndarray, add: np.ndarray) -> np.ndarray:
    """f32 ``fma(x, mul, add)`` as the plugin's ``_mm512_fmadd_ps``: the f64 product is exact
    (24 + 24 bits); the sum is rounded to f64 and then to f32. That equals a single rounding
    except for double-rounding ties, never seen in the measurements (bit-exact tests)."""
    out = x.astype(np.float64) * mul.astype(np.float64) + add.astype(np.float64)
    return out.astype(_F32)


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(_F32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even (finite inputs), returned as uint16 bit patterns."""
    b = np.ascontiguousarray(x, dtype=_F32).view(np.uint32)
    return ((b + (((b >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)


def _pack_u4(q: np.ndarray) -> np.ndarray:
    """[..., D] codes 0..15 -> [..., D/2] bytes, even channel in the high nibble."""
    return ((q[..., 0::2] << 4) | q[..., 1::2]).astype(np.uint8)


def _unpack_u4(b: np.ndarray) -> np.ndarray:
    """[..., D/2] bytes -> [..., D] codes (inverse of :func:`_pack_u4`)."""
    out = np.empty((*b.shape[:-1], b.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = b >> 4
    out[..., 1::2] = b & 0x0F
    return out


def quantize_by_token(x: np.ndarray, levels: int = 255) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """The plugin's per-token value quantization of ``x`` f32 [..., D] over axis -1.

    Returns codes u8 [..., D], scale f32 [...], zp f32 [...].
    """
    x = np.asarray(x, dtype=_F32)
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    scale = ((hi - lo) / _F32(levels)).astype(_F32)
    scale = np.where(scale == 0, _F32(0.0001), scale).astype(_F32)
    zp = (-lo / scale).astype(_F32)
    inv = (_F32(1.0) / scale).astype(_F32)
    q = np.rint(_fma_f32(x, inv[..., None], zp[..., None]))
    return np.clip(q, 0, levels).astype(np.uint8), scale, zp


@dataclass(frozen=True)
class CacheLayout:
    """One cache input's block format: ``kind`` (key / value), ``precision`` (u8, u4, bf16, f16,
    f32), stored ``rows`` x ``cols`` of one head-block in elements of that precision,
    ``block_size`` tokens and ``head_dim``. Build with :meth:`from_compiled` or :meth:`from_shape`.
    """

    kind: str
    precision: str
    rows: int
    cols: int
    block_size: int
    head_dim: int

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_shape(cls, kind: str, precision: str, rows: int, cols: int,
                   block_size: int | None = None) -> CacheLayout:
        """Layout of a head-block stored as ``[rows, cols]`` of ``precision``."""
        if kind not in (KEY, VALUE):
            raise ValueError(f"CacheLayout: kind must be 'key' or 'value', not {kind!r}")
        if precision not in QUANTIZED + PLAIN:
            raise ValueError(f"CacheLayout: unsupported precision {precision!r}")
        extra = _HEADER_BYTES * 8 // _bits(precision) if precision in QUANTIZED else 0
        if kind == KEY:
            bs, d = rows - extra, cols
        else:
            bs, d = rows, cols - extra
        if block_size is not None and block_size != bs:
            raise ValueError(f"CacheLayout: {kind} [{rows}, {cols}] {precision} implies block "
                             f"size {bs}, not {block_size}")
        if bs <= 0 or d <= 0 or (precision == "u4" and d % 2):
            raise ValueError(f"CacheLayout: bad {kind} shape [{rows}, {cols}] for {precision}")
        return cls(kind, precision, rows, cols, bs, d)

    @classmethod
    def from_port(cls, kind: str, port: ov.Output | ov.ConstOutput) -> CacheLayout:
        """From a compiled model's ``key_cache.L`` / ``value_cache.L`` input port."""
        dims = [d.get_length() for d in list(port.get_partial_shape())[-2:]]
        return cls.from_shape(kind, port.get_element_type().get_type_name(), *dims)

    @classmethod
    def from_tensor(cls, kind: str, tensor: ov.Tensor) -> CacheLayout:
        """From an allocated cache tensor ``[NB, H, rows, cols]``."""
        shape = list(tensor.get_shape())
        return cls.from_shape(kind, tensor.get_element_type().get_type_name(), *shape[-2:])

    @classmethod
    def from_compiled(cls, compiled: ov.CompiledModel,
                      layer: int = 0) -> tuple[CacheLayout, CacheLayout]:
        """(key layout, value layout) of ``key_cache.<layer>`` / ``value_cache.<layer>``.

        Raises ``NotImplementedError`` for non-default KEY/VALUE_CACHE_GROUP_SIZE.
        """
        for prop in ("KEY_CACHE_GROUP_SIZE", "VALUE_CACHE_GROUP_SIZE"):
            try:
                group = int(compiled.get_property(prop))
            except Exception:  # a device without the property
                continue
            if group != 0:
                raise NotImplementedError(f"kv_codec: {prop}={group} (only 0 is supported)")
        key = cls.from_port(KEY, compiled.input(f"key_cache.{layer}"))
        value = cls.from_port(VALUE, compiled.input(f"value_cache.{layer}"))
        if key.block_size != value.block_size:
            raise ValueError(f"kv_codec: key block size {key.block_size} != value "
                             f"{value.block_size}")
        return key, value

    # ----------------------------------------------------------------- geometry
    @property
    def by_channel(self) -> bool:
        """Keys quantized per channel inside each block (u8 / u4 keys)."""
        return self.kind == KEY and self.precision in QUANTIZED

    @property
    def head_block_bytes(self) -> int:
        return self.rows * self.cols * _bits(self.precision) // 8

    @property
    def header_bytes(self) -> int:
        """Bytes before the first token row (the per-channel header of by-channel keys)."""
        return _HEADER_BYTES * self.head_dim if self.by_channel else 0

    @property
    def row_bytes(self) -> int:
        """Bytes of one token row (header columns included for per-token values)."""
        return (self.head_block_bytes - self.header_bytes) // self.block_size

    @cached_property
    def native(self) -> _core.BlockLayout:
        """This geometry for the C++ core (``kvcrush::BlockLayout``)."""
        return _core.BlockLayout(by_channel=self.by_channel, levels=_levels(self.precision),
                                 block_size=self.block_size, head_dim=self.head_dim,
                                 head_block_bytes=self.head_block_bytes,
                                 header_bytes=self.header_bytes, row_bytes=self.row_bytes)

    # ----------------------------------------------------------------- one head-block
    def _bytes(self, block: np.ndarray) -> np.ndarray:
        b = np.ascontiguousarray(block).view(np.uint8).reshape(-1)
        if b.size != self.head_block_bytes:
            raise ValueError(f"kv_codec: head-block of {b.size} bytes, expected "
                             f"{self.head_block_bytes} ({self})")
        return b

    def _decode_rows(self, blocks: np.ndarray, which: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` [M] of head-blocks ``blocks[which]`` (u8 [U, head_block_bytes]) -> f32
        [M, D]."""
        if self.by_channel:  # C++: kvcrush::decode_by_channel
            return _core.decode_by_channel(np.ascontiguousarray(blocks),
                                           np.asarray(which, dtype=np.int64),
                                           np.asarray(rows, dtype=np.int64), self.native)
        u = len(blocks)
        data = blocks.reshape(u, self.block_size, self.row_bytes)[which, rows]
        return self._decode_token_rows(data)

    def _decode_token_rows(self, data: np.ndarray) -> np.ndarray:
        """Self-contained token rows u8 [M, row_bytes] -> f32 [M, D] (values / plain keys)."""
        data = np.ascontiguousarray(data)
        if self.precision in QUANTIZED:
            hdr = np.ascontiguousarray(data[:, :_HEADER_BYTES]).view(_F32)
            q = data[:, _HEADER_BYTES:]
            if self.precision == "u4":
                q = _unpack_u4(q)
            return (q.astype(_F32) - hdr[:, 1:2]) * hdr[:, 0:1]
        if self.precision == "f32":
            return data.view(_F32).copy()
        if self.precision == "f16":
            return data.view(np.float16).astype(_F32)
        return _bf16_to_f32(data.view(np.uint16))

    def dequantize_rows(self, block: np.ndarray, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Token rows ``rows`` [n] of one head-block -> f32 [n, head_dim].

        ``block`` is the head-block as stored ([rows, cols] of u8 / bf16-as-f16 / f32, or its raw
        bytes in any shape, e.g. a slice of a flat u4 tensor).
        """
        b = self._bytes(block)
        r = np.asarray(rows, dtype=np.int64).reshape(-1)
        if r.size and (r.min() < 0 or r.max() >= self.block_size):
            raise IndexError(f"kv_codec: rows {r} outside block of {self.block_size}")
        return self._decode_rows(b[None, :], np.zeros(len(r), dtype=np.int64), r)

    def _encode_blocks(self, x: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """x f32 [N, bs, D] (rows >= counts[i] are ignored) -> u8 [N, head_block_bytes]."""
        if self.by_channel:  # C++: kvcrush::encode_by_channel
            return _core.encode_by_channel(np.ascontiguousarray(x, dtype=_F32),
                                           np.asarray(counts, dtype=np.int64), self.native)
        n_blocks, bs, _ = x.shape
        valid = np.arange(bs)[None, :] < counts[:, None]  # [N, bs]
        out = np.zeros((n_blocks, self.head_block_bytes), dtype=np.uint8)
        rows = out.reshape(n_blocks, bs, self.row_bytes)
        rows[valid] = self._encode_token_rows(x[valid])
        return out

    def _encode_token_rows(self, x: np.ndarray) -> np.ndarray:
        """f32 [M, D] -> self-contained token rows u8 [M, row_bytes]."""
        m = len(x)
        if self.precision in QUANTIZED:
            q, scale, zp = quantize_by_token(x, _levels(self.precision))
            if self.precision == "u4":
                q = _pack_u4(q)
            hdr = np.stack([scale, zp], axis=1).astype(_F32).view(np.uint8)
            return np.concatenate([hdr.reshape(m, _HEADER_BYTES), q], axis=1)
        if self.precision == "f32":
            return np.ascontiguousarray(x, dtype=_F32).view(np.uint8).reshape(m, -1)
        if self.precision == "f16":
            return np.ascontiguousarray(x, dtype=np.float16).view(np.uint8).reshape(m, -1)
        return _f32_to_bf16(x).view(np.uint8).reshape(m, -1)

    def encode_block(self, x: np.ndarray) -> np.ndarray:
        """Encode f32 ``x`` [n <= block_size, head_dim] as one head-block in the stored format.

        Returns the head-block's raw bytes, u8 [head_block_bytes] (reshape to [rows, cols] for
        u8; ``.view`` as needed). Rows ``>= n`` are zero (the plugin never reads them); by-channel
        key scales cover the ``n`` rows only, as the plugin does for a partially filled block.
        """
        x = np.asarray(x, dtype=_F32)
        if x.ndim != 2 or x.shape[1] != self.head_dim or x.shape[0] > self.block_size:
            raise ValueError(f"kv_codec: encode_block needs [n <= {self.block_size}, "
                             f"{self.head_dim}], got {x.shape}")
        padded = np.zeros((1, self.block_size, self.head_dim), dtype=_F32)
        padded[0, :len(x)] = x
        return self._encode_blocks(padded, np.asarray([len(x)]))[0]

    # ----------------------------------------------------------------- whole caches
    def head_blocks(self, cache: ov.Tensor | np.ndarray, head: int | None = None) -> np.ndarray:
        """Writable raw-byte view u8 [NB, head_block_bytes] of one head of ``cache``.

        ``cache``: an ov.Tensor or a C-contiguous array whose dim 0 is the block (``[NB, H, rows,
        cols]``, ``[NB, H * head_block_bytes]`` bytes, ...); ``H`` = bytes per block / head-block
        bytes. A flat 1-D byte array (a u4 tensor's ``.data``) counts as ``[NB, 1, ...]``.
        ``head`` selects one of the ``H`` and may be omitted when H == 1 (per-head pools
        ``[NB*Hkv, 1, rows, cols]``).
        """
        raw, head = self.raw_heads(cache, head)
        return raw[:, head, :]

    def table_rows(self, head_blocks: np.ndarray, table: Sequence[int] | np.ndarray,
                   count: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Token rows of one block table -> f32 [n, D]: rows ``0..count-1`` (or ``rows`` [n],
        row indices into the table) of the head-blocks ``table`` of ``head_blocks`` (u8
        [NB, head_block_bytes], e.g. :meth:`head_blocks`)."""
        r = np.arange(count, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        if r.size == 0:
            return np.zeros((0, self.head_dim), _F32)
        t = np.asarray(table, dtype=np.int64)
        used = int(r.max()) // self.block_size + 1
        if used > len(t):
            raise IndexError(f"kv_codec: row {int(r.max())} outside a table of {len(t)} blocks")
        return self._decode_rows(head_blocks[t[:used]], r // self.block_size, r % self.block_size)

    def raw_heads(self, cache: ov.Tensor | np.ndarray,
                   head: int | None) -> tuple[np.ndarray, int]:
        """(u8 [NB, H, head_block_bytes] view of ``cache``'s memory, the head index)."""
        if isinstance(cache, ov.Tensor):
            arr, nb = cache.data, int(cache.get_shape()[0])
        else:
            arr = cache
            nb = arr.shape[0] if arr.ndim > 1 else arr.nbytes // self.head_block_bytes
        if not arr.flags.c_contiguous:
            raise ValueError("kv_codec: the cache array must be C-contiguous (compacted in place)")
        raw = arr.reshape(-1).view(np.uint8)
        heads = raw.size // max(1, nb * self.head_block_bytes)
        if nb == 0 or raw.size != nb * heads * self.head_block_bytes:
            raise ValueError(f"kv_codec: cache of {raw.size} bytes is not {nb} blocks of whole "
                             f"head-blocks of {self.head_block_bytes} bytes")
        raw = raw.reshape(nb, heads, self.head_block_bytes)
        if head is None:
            if heads != 1:
                raise ValueError(f"kv_codec: cache has {heads} heads; pass head=")
            head = 0
        if not 0 <= head < heads:
            raise IndexError(f"kv_codec: head {head} outside 0..{heads - 1}")
        return raw, head

    def compact(self, cache: ov.Tensor | np.ndarray, moves: Sequence[Move] | FlatMoves,
                head: int | None = None, lossless_single_source: bool = True) -> None:
        """Rewrite destination blocks densely from source rows, in place (C++:
        ``kvcrush::compact_blocks``, parallel over the destinations).

        ``moves``: ``(dst_block, [(src_block, src_row), ...])`` per destination (or the same as
        :func:`flatten_moves` made them); the listed rows become rows ``0..n-1`` of
        ``dst_block`` in that order (``n <= block_size``); rows ``>= n`` are zeroed. Block
        indices are along dim 0 of ``cache`` (for a per-head pool, physical head-blocks);
        ``head`` as in :meth:`head_blocks`.

        Precondition: destination blocks are distinct (else ValueError; an index outside the
        cache: IndexError; nothing is written then). Sources may be anywhere, including in
        destination blocks of this same call (in-place compaction): every new block is built
        before any destination is written, so no ordering is required. Memory: the new blocks.

        Values and unquantized keys: lossless row copies (u8 values keep their per-token scale).
        u8 / u4 keys: a destination whose rows all come from one source block keeps that block's
        scale / zero point and codes (lossless, unless ``lossless_single_source=False``); other
        destinations are dequantized and re-quantized with the plugin's formula.
        """
        flat = moves if isinstance(moves, FlatMoves) else flatten_moves(moves)
        if not len(flat.dst):
            return
        raw, head = self.raw_heads(cache, head)
        _core.compact_blocks(raw, head, self.native, flat.dst, flat.offsets, flat.pairs,
                             lossless_single_source)


@dataclass(frozen=True)
class FlatMoves:
    """Moves as arrays: destination ``i`` is block ``dst[i]`` and receives the rows
    ``pairs[offsets[i]:offsets[i + 1]]`` (``(source block, source row)`` each).

    dst: int64 [K]; offsets: int64 [K + 1]; pairs: int64 [P, 2].
    """

    dst: np.ndarray
    offsets: np.ndarray
    pairs: np.ndarray


def flatten_moves(moves: Sequence[Move]) -> FlatMoves:
    """:class:`FlatMoves` of ``moves`` (``(dst_block, [(src_block, src_row), ...])`` each)."""
    dst = np.fromiter((int(d) for d, _ in moves), dtype=np.int64, count=len(moves))
    srcs = [np.asarray(s, dtype=np.int64).reshape(-1, 2) for _, s in moves]
    offsets = np.zeros(len(moves) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in srcs], out=offsets[1:])
    pairs = np.concatenate(srcs) if offsets[-1] else np.zeros((0, 2), dtype=np.int64)
    return FlatMoves(dst, offsets, np.ascontiguousarray(pairs))


def compact_kv(key_layout: CacheLayout, value_layout: CacheLayout,
               key_cache: ov.Tensor | np.ndarray, value_cache: ov.Tensor | np.ndarray,
               moves: Sequence[Move], head: int | None = None) -> None:
    """:meth:`CacheLayout.compact` of one layer's key and value caches with the same moves."""
    moves = flatten_moves(moves)
    key_layout.compact(key_cache, moves, head)
    value_layout.compact(value_cache, moves, head)
