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
        # put_tails' steps not yet written into acc: [(values [L, n, H], rows [L, H])]
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.acc = [[np.zeros(0, np.float32) for _ in range(num_kv_heads)]
                    for _ in range(num_layers)]
        self.query_positions: list[int] = []
        self._q: np.ndarray | None = None  # query_positions as an array, rebuilt when it grew

    @property
    def acc(self) -> list[list[np.ndarray]]:
        """[L][H] float32 [rows]: the scores (put_tails' pending steps written in first)."""
        if self._pending:
            self._flush()
        return self._acc

    @acc.setter
    def acc(self, value: list[list[np.ndarray]]) -> None:
        self._pending = []
        self._acc = value

    #: put_tails buffers this many tokens before writing them (decode steps bring one each)
    PENDING_TOKENS = 64

    def put_tails(self, values: np.ndarray, rows: np.ndarray) -> None:
        """:meth:`put_tail` for every (layer, head) at once: ``values`` f32 [L, n, H], ``rows``
        int [L, H] (after the step). Buffered while the steps follow each other (each step's
        rows start where the last one's ended), written in one go when :attr:`acc` is read or
        :data:`PENDING_TOKENS` tokens wait: a decode step then costs an append, not L * H
        array copies."""
        rows = np.asarray(rows)
        if self._pending:
            last_values, last_rows = self._pending[-1]
            if not np.array_equal(rows - values.shape[1], last_rows):
                self._flush()
        self._pending.append((values, rows))
        if sum(v.shape[1] for v, _ in self._pending) >= self.PENDING_TOKENS:
            self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        values = np.concatenate([v for v, _ in pending], axis=1) if len(pending) > 1 \
            else pending[0][0]
        rows = pending[-1][1]
        for layer in range(values.shape[0]):
            for h in range(values.shape[2]):
                self.put_tail(layer, h, values[layer, :, h], int(rows[layer, h]))

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

    def put_tail(self, layer: int, head: int, values: np.ndarray, rows: int) -> None:
        """Rows ``rows - len(values) .. rows - 1`` of (layer, head) get ``values`` (rows between
        the accumulated ones and these stay 0; accumulated rows at or past the first are
        replaced: a recomputed token). For scores given once per row (KVzap's predictions)."""
        acc = self.acc[layer][head]
        first = rows - len(values)
        if first < 0:
            raise ValueError(f"scores of layer {layer} head {head}: {len(values)} values for "
                             f"{rows} rows")
        if len(acc) > first:
            acc = acc[:first]
        parts = (acc, np.zeros(first - len(acc), np.float32), values) if len(acc) < first \
            else (acc, values)
        self.acc[layer][head] = np.concatenate(parts).astype(np.float32, copy=False)

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
