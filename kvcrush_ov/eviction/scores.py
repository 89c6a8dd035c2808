"""Attention scores accumulated per sequence, layer and KV head, aligned with the cached rows.

The per-head graph returns, for every (layer, sequence, KV head), one score per context token
(cached rows in table order, then this step's tokens) summed over the head's query heads and over
the step's last ``window`` queries. :class:`SequenceScores` adds these up over steps, so that
``acc[l][h][r]`` is the attention row ``r`` of head ``h`` in layer ``l`` received from every
scored query so far, and records the positions of the scored queries (a token at position ``p``
was seen by the scored queries at positions ``>= p``: the ``counts`` of ``norm_sum``).
"""

from __future__ import annotations

import numpy as np

from kvcrush_ov import _core


class SequenceScores:
    """acc[l][h]: float32 [rows]; query_positions: sorted positions of the scored queries."""

    def __init__(self, num_layers: int, num_kv_heads: int, reduce: str = "sum") -> None:
        """reduce: how steps combine, ``sum`` (attention accumulated) or ``max`` (the largest
        one step gave: with steps of a few queries, close to the largest any query gave)."""
        if reduce not in ("sum", "max"):
            raise ValueError(f"SequenceScores.reduce={reduce!r}: allowed sum, max")
        self.reduce = reduce
        self.acc = [[np.zeros(0, np.float32) for _ in range(num_kv_heads)]
                    for _ in range(num_layers)]
        self.query_positions: list[int] = []
        self._q: np.ndarray | None = None  # query_positions as an array, rebuilt when it grew

    def add(self, layer: int, head: int, segment: np.ndarray) -> None:
        """Add one step's scores ``segment`` [rows after the step] of (layer, head)."""
        acc = self.acc[layer][head]
        if len(acc) > len(segment):
            raise ValueError(f"scores of layer {layer} head {head}: {len(segment)} rows, "
                             f"{len(acc)} already accumulated")
        out = segment.astype(np.float32, copy=True)
        if self.reduce == "max":
            np.maximum(out[:len(acc)], acc, out=out[:len(acc)])
        else:
            out[:len(acc)] += acc
        self.acc[layer][head] = out

    def add_queries(self, first: int, count: int) -> None:
        """The scored queries of a step were positions ``first .. first + count - 1``. Not
        recorded with ``reduce="max"``: a largest attention is not normalised by how many
        queries saw a token (``counts`` are then zero, and norm_sum divides by 1)."""
        if self.reduce == "max":
            return
        self.query_positions.extend(range(first, first + count))
        self._q = None

    def aligned(self, layer: int, head: int, rows: int) -> np.ndarray:
        """acc of (layer, head) padded with zeros to ``rows`` (rows never scored got 0)."""
        acc = self.acc[layer][head]
        if len(acc) < rows:
            acc = np.concatenate([acc, np.zeros(rows - len(acc), np.float32)])
            self.acc[layer][head] = acc
        return acc

    def queries(self) -> np.ndarray:
        """int64 [Q]: query_positions as an array (cached until more queries are added)."""
        if self._q is None:
            self._q = np.asarray(self.query_positions, dtype=np.int64)  # sorted by construction
        return self._q

    def counts(self, positions: np.ndarray) -> np.ndarray:
        """float32 [n]: scored queries that could see each position (query position >= p)."""
        q = self.queries()
        out = np.full(positions.shape, float(len(q)), np.float32)
        if len(q):  # only positions after the first scored query were seen by fewer queries
            late = positions > q[0]
            out[late] = len(q) - np.searchsorted(q, positions[late], side="left")
        return out

    def compact(self, rows: list[list[np.ndarray]]) -> None:
        """Follow the cache manager's compaction: new row ``i`` of (l, h) is old row
        ``rows[l][h][i]`` (rows never scored stay 0)."""
        for layer, row in enumerate(rows):
            for h, order in enumerate(row):
                acc = self.acc[layer][h]
                seen = order < len(acc)
                kept = np.zeros(len(order), np.float32)
                kept[seen] = acc[order[seen]]
                self.acc[layer][h] = kept

    def compact_flat(self, order: np.ndarray, offsets: np.ndarray) -> None:
        """:meth:`compact` with the new orders flat (HeadKVCacheManager.compact_flat's
        Compaction): new row ``i`` of table ``r`` (= layer * H + head) is old row
        ``order[offsets[r] + i]`` (int64 [K], offsets int64 [L * H + 1]); one gather for
        every table."""
        flat = [a for row in self.acc for a in row]
        heads = len(self.acc[0]) if self.acc else 0
        if len(offsets) != len(flat) + 1:
            raise ValueError(f"scores: offsets has {len(offsets)} entries, "
                             f"{len(flat) + 1} expected (L * H + 1)")
        if not flat:
            return
        # one C++ pass (parallel over tables; numpy's concatenate / repeat / fancy indexing
        # took about 1 ms an event for a 4K prompt's 90 tables on two cores)
        out = _core.gather_rows([np.ascontiguousarray(a, np.float32) for a in flat],
                                np.ascontiguousarray(order, np.int64),
                                np.ascontiguousarray(offsets, np.int64))
        parts = np.split(out, offsets[1:-1])
        self.acc = [parts[i:i + heads] for i in range(0, len(parts), heads)]
