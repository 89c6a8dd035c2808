"""Replay scores of a step by groups of queries: each cached row's largest grouped attention.

PagedAttention's ``scores.L`` sum a step's scored queries, so KVzip's replay ran in steps of a
few queries (a row keeping the largest sum one step gave it). With the step's queries and keys
as outputs (``transformations/query_key.py``), :class:`ReplayScorer` computes the same beside
a step of any size, per layer and KV head::

    p[t, g, j] = softmax_j(scale * q[t, g] . k[j])   over the keys j <= first + t
    score[j]   = max over groups  sum_{t in group} sum_g  p[t, g, j]

``t`` runs over the step's scored queries (the last ``w`` of the chunk, ``first`` the cache row
of the first one), grouped by position into aligned groups of ``group`` queries (positions
``[k * group, (k + 1) * group)``: the steps of a replay in steps of ``group``; ``group = 1`` is
KVzip's own maximum over single queries), ``g`` over the ``G`` query heads of the KV head
(summed, as the per-head ``scores.L`` sum them), ``j`` over the rows the sequence holds after
the step. A group must not span two steps (the replay's steps are aligned to a multiple of
it). The keys of rows cached before the step are decoded from the cache once (the dequantized
values PagedAttention reads) and kept per sequence; each step's own keys are appended as the
model computed them.

The logits come from a small OpenVINO graph (one call per layer, ``[Hkv, w*G, K]``), the
softmax, the sums and the maximum from one pass of the C++ core over them
(``_core.grouped_max_scores``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from kvcrush_ov import _core

_F32 = np.float32


def build_logits(num_kv_heads: int, query_heads: int, head_size: int, scale: float) -> ov.Model:
    """The per-layer logits graph. Inputs: ``query`` f32 [Hkv, w, G*D], ``keys`` f32
    [K, Hkv, D] (row order of the cache). Output ``logits`` f32 [Hkv, w*G, K]:
    ``scale * q . k`` (query ``t``'s head ``g`` at row ``t*G + g``)."""
    h, d = num_kv_heads, head_size
    q = ops.parameter([h, -1, query_heads * d], ov.Type.f32, name="query")
    k = ops.parameter([-1, h, d], ov.Type.f32, name="keys")
    i64 = np.int64
    q3 = ops.reshape(q, ops.constant(np.array([h, -1, d], i64)), False)  # [H, w*G, D]
    kt = ops.transpose(k, ops.constant(np.array([1, 0, 2], i64)))       # [H, K, D]
    logits = ops.multiply(ops.matmul(q3, kt, False, True), ops.constant(np.float32(scale)))
    res = ops.result(logits)
    res.output(0).get_tensor().set_names({"logits"})
    return ov.Model([res], [q, k], "replay_logits")


@dataclass
class _Keys:
    """One sequence's keys per layer: buf[l] f32 [cap, Hkv, D]; rows[l, h]: rows filled."""

    buf: list[np.ndarray]
    rows: np.ndarray


class ReplayScorer:
    """Grouped maximum scores for the chunks of a step (module doc): the logits from a small
    OpenVINO graph (a batched matmul, on the engine's device and inference precision), the
    softmax and the grouped maximum in the C++ core (``kvcrush/replay_scores.hpp``).

    ``read_keys(table, layer, head, n)``: f32 [n, D], the first ``n`` cached keys of a
    sequence's (layer, head) in row order, ``table`` its block table (dequantized from the
    cache)."""

    def __init__(self, core: ov.Core, device: str, props: dict, num_layers: int,
                 num_kv_heads: int, query_heads: int, head_size: int, scale: float,
                 read_keys: Callable[[object, int, int, int], np.ndarray]) -> None:
        """``query_heads``: G, the query heads per KV head; ``scale``: the softmax scale."""
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.query_heads, self.head_size = query_heads, head_size
        self.read_keys = read_keys
        keep = {k: v for k, v in props.items() if k in ("INFERENCE_PRECISION_HINT",
                                                         "INFERENCE_NUM_THREADS")}
        self.request = core.compile_model(build_logits(num_kv_heads, query_heads, head_size,
                                                       scale), device, keep).create_infer_request()
        self._keys: dict[int, _Keys] = {}
        self.decoded_rows = 0  # rows read back from the cache (tests: once per replay)

    def retain(self, seq_ids: set[int]) -> None:
        """Keep the keys of ``seq_ids`` only."""
        for sid in list(self._keys):
            if sid not in seq_ids:
                del self._keys[sid]

    def _keys_for(self, seq_id: int, table: object, layer: int, past: np.ndarray,
                  need: int) -> np.ndarray:
        """Layer ``layer``'s key buffer of ``seq_id`` holding its ``past[h]`` cached rows per
        head (read from the cache where the kept rows differ), at least ``need`` rows long."""
        h, d = self.num_kv_heads, self.head_size
        st = self._keys.get(seq_id)
        if st is None:
            st = _Keys([np.zeros((0, h, d), _F32) for _ in range(self.num_layers)],
                       np.full((self.num_layers, h), -1, np.int64))
            self._keys[seq_id] = st
        buf = st.buf[layer]
        if len(buf) < need:
            grown = np.zeros((max(need, 2 * len(buf)), h, d), _F32)
            grown[:len(buf)] = buf
            st.buf[layer] = buf = grown
        for head in range(h):
            n = int(past[head])
            if st.rows[layer, head] != n:
                buf[:n, head] = self.read_keys(table, layer, head, n)
                self.decoded_rows += n
        return buf

    def score(self, seq_id: int, table: object, layer: int, past: np.ndarray,
              query: np.ndarray, keys: np.ndarray, query_group: int = 1,
              lead: int = 0) -> list[np.ndarray]:
        """One layer of one chunk of sequence ``seq_id`` (block table ``table``). ``past``
        [Hkv]: rows cached before the step; ``query`` f32 [Hkv, w, G*D]: the chunk's last ``w``
        queries; ``keys`` f32 [Hkv, T, D]: the chunk's keys (``T >= w``); ``lead``: queries of
        the first one's group before it (its position modulo ``query_group``). Returns per
        head f32 [past[h] + T]: each row's largest attention summed over a group of queries
        (and over the head's query heads)."""
        if not 0 <= lead < query_group:
            raise ValueError(f"ReplayScorer.score: lead={lead}, allowed 0..{query_group - 1}")
        t = keys.shape[1]
        w = query.shape[1]
        past = np.asarray(past, np.int64)
        total = int(past.max()) + t
        buf = self._keys_for(seq_id, table, layer, past, total)
        for head in range(self.num_kv_heads):
            buf[past[head]:past[head] + t, head] = keys[head]
        req = self.request
        req.set_tensor("query", ov.Tensor(np.ascontiguousarray(query, _F32)))
        req.set_tensor("keys", ov.Tensor(buf[:total], shared_memory=True))
        req.infer()
        logits = req.get_tensor("logits").data.reshape(self.num_kv_heads, w, self.query_heads,
                                                        total)
        first = (past + t - w).astype(np.int32)
        out = _core.grouped_max_scores(logits, first, query_group, lead)
        st = self._keys[seq_id]
        st.rows[layer] = past + t
        return [np.array(out[head, :past[head] + t]) for head in range(self.num_kv_heads)]


def rescore_step(scorer: ReplayScorer, chunks: list, windows: list[int],
                 tables: list, queries: list[np.ndarray], keys: list[np.ndarray],
                 scores: list[np.ndarray], exact: list[int], groups: list[int]) -> None:
    """Replace, in the step's flat ``scores.L`` (head-major segments ``j = h*B + s``, each as
    long as the sequence's rows after the step: per_head.py), the segments of the chunks
    ``exact`` (indices into ``chunks``, each with ``windows[i] >= 1``) by their grouped maximum
    (``groups[k]``: the query group of chunk ``exact[k]``, its groups aligned to positions).
    ``tables[i].lens`` [L, Hkv]: rows after the step; ``queries`` / ``keys``: the step's
    ``attn_query.L`` / ``attn_key.L`` (rows ``h*T + t``). The scorer keeps the keys of these
    chunks' sequences only."""
    counts = np.array([c.num_tokens for c in chunks], np.int64)
    begins = np.concatenate([[0], np.cumsum(counts)[:-1]])
    total = int(counts.sum())
    batch, heads = len(chunks), scorer.num_kv_heads
    lens = np.stack([t.lens for t in tables])  # [B, L, H]
    scorer.retain({chunks[i].seq.seq_id for i in exact})
    for layer in range(scorer.num_layers):
        seg = lens[:, layer, :].T.reshape(-1)  # j = h*B + s
        offsets = np.concatenate([[0], np.cumsum(seg)])
        q_all, k_all = queries[layer], keys[layer]
        for i, group in zip(exact, groups, strict=True):
            n, w = int(counts[i]), int(windows[i])
            rows = [h * total + int(begins[i]) for h in range(heads)]
            query = np.stack([q_all[r + n - w:r + n] for r in rows])
            key = np.stack([k_all[r:r + n] for r in rows])
            past = lens[i, layer] - n
            lead = (chunks[i].start + n - w) % group
            got = scorer.score(chunks[i].seq.seq_id, tables[i], layer, past, query, key, group,
                               lead)
            for h in range(heads):
                j = h * batch + i
                scores[layer][offsets[j]:offsets[j + 1]] = got[h]
