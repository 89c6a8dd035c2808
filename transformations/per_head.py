"""Per-KV-head block tables, lengths and attention scores for a paged-attention model.

:func:`to_per_head` rewrites a model converted by :func:`kvcrush_ov.transformations.paged.to_paged`
(score outputs on) so that every (sequence, KV head) pair is its own PagedAttention subsequence
("heads as sequences"): one ``PagedAttentionExtension`` per layer is kept, but each layer gets its
own block table and past lengths per KV head, and ``scores.L`` is split per KV head.

Notation: ``B`` sequences with ``n[s]`` new tokens each, ``T = sum(n)``; ``Hq`` query heads,
``Hkv`` KV heads, ``G = Hq / Hkv`` (query head ``i`` belongs to KV head ``i // G``), head sizes
``D`` (keys) and ``Dv`` (values). Subsequences are ordered head-major: index ``j = h * B + s``
for KV head ``h`` of sequence ``s`` (this keeps the token offsets increasing).

Graph, per layer (``L`` = layer index, as in ``key_cache.L``)::

    query [T, Hq*D]  -> [T, Hkv, G*D] -> transpose -> [Hkv, T, G*D] -> [Hkv*T, G*D]
    key   [T, Hkv*D] -> [T, Hkv, D]   -> transpose -> [Hkv*T, D]      (value likewise with Dv)
    PagedAttention(num_k_heads = num_v_heads = 1, G query heads per subsequence)
    out [Hkv*T, G*Dv] -> [Hkv, T, G*Dv] -> transpose -> [T, Hkv, G*Dv] -> [T, Hq*Dv]

``sequence_major=True`` orders subsequences ``j = s * Hkv + h`` instead: with one new token per
sequence (``T = B``, decode steps) the rows of ``[T, Hkv, width]`` are already grouped per
subsequence, so q / k / v and the output are plain reshapes and the four transposes per layer
disappear (measured on Qwen2.5-0.5B: the per-head graph's decode overhead over the plain graph
went from 8.6% to 3.8%). Such a model only accepts steps with one token per sequence; everything
below that says ``j = h*B + s`` then reads ``j = s*Hkv + h`` (:class:`PerHeadLayout` handles both).

Inputs after the rewrite (all i32 unless noted; shared inputs ``input_ids``, ``position_ids``,
``max_context_len`` and ``logits_indices`` are unchanged):

- ``head_subsequence_begins`` [B*Hkv + 1] (shared by all layers): token offsets into the
  ``Hkv*T`` layout; entry ``h*B + s`` is ``h*T + begins[s]`` (``begins`` = the old
  ``subsequence_begins``), the last entry is ``Hkv*T``.
- ``head_past_lens.L`` [B*Hkv] per layer: cached tokens of KV head ``h`` of sequence ``s`` at
  index ``h*B + s`` (may differ per layer and head after eviction).
- ``block_indices.L`` [*] and ``block_indices_begins.L`` [B*Hkv + 1] per layer: the block table
  of subsequence ``j`` is ``block_indices.L[begins[j]:begins[j+1]]``; the blocks are indices into
  the per-head pool of that layer.
- ``key_cache.L`` / ``value_cache.L``: per-head pools ``[num_blocks, 1, rows, cols]`` (read the
  exact dims from the compiled model). A plain ``[NB, Hkv, rows, cols]`` cache is the same memory
  as ``[NB*Hkv, 1, rows, cols]``: block ``b`` of head ``h`` is physical block ``b*Hkv + h``.
- The old ``past_lens``, ``subsequence_begins``, ``block_indices`` and ``block_indices_begins``
  are removed when nothing else consumes them (true for tiny-random-llama and SmolLM2; other
  exports untested), else kept and still need values.
- ``max_context_len`` [] stays shared: the largest context length over all layers, sequences
  and heads of the step.
- With score aggregation, ``score_aggregation_window`` [B] stays per sequence (tiled per head in
  the graph).

Outputs: ``logits`` unchanged; ``scores.L`` [sum over j of ctx(j)] with ``ctx(j) =
head_past_lens.L[j] + n[s]``: segment ``j = h*B + s`` (segments concatenated in ``j`` order)
holds, for every context token of sequence ``s`` in KV head ``h`` (cached ones in block-table
order, then this step's), its attention probability summed over the ``G`` query heads of that KV
head, taken at the LAST query token of the sequence in this step (measured: each segment sums to
``G``; with score aggregation, summed over the last ``score_aggregation_window[s]`` queries).
Summing the ``Hkv`` segments of a sequence gives the plain model's ``scores.L`` segment.

Unsupported (raise :class:`PerHeadPatternError`): ALiBi, cache rotation, xattention, sinks,
adaptive RKV and qq-bias inputs, KV-head counts that differ between layers, models without score
outputs. The number of KV heads and layers is recorded in the model's rt_info
(``kvcrush_per_head``) for :meth:`PerHeadLayout.from_model`.

:class:`PerHeadLayout` builds these inputs from per-sequence token counts, per-layer per-head
past lengths and block tables, and splits ``scores.L`` back into segments.

The rewrite itself is the C++ pass ``kvcrush::ToPerHead`` (``cpp/include/kvcrush/passes.hpp``,
which also draws the graph and names the new nodes), run through ``kvcrush_ov._core``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import openvino as ov

from kvcrush_ov import _core
from kvcrush_ov.transformations._native import model_address

PA_TYPE = "PagedAttentionExtension"
HEAD_SUBSEQUENCE_BEGINS = "head_subsequence_begins"
_RT_KEY = "kvcrush_per_head"


class PerHeadPatternError(RuntimeError):
    """The model does not have the paged-attention layout :func:`to_per_head` expects."""


def head_past_lens_name(layer: int) -> str:
    """Name of layer ``layer``'s ``head_past_lens.L`` input ([B*Hkv] i32)."""
    return f"head_past_lens.{layer}"


def block_indices_name(layer: int) -> str:
    """Name of layer ``layer``'s ``block_indices.L`` input ([*] i32)."""
    return f"block_indices.{layer}"


def block_indices_begins_name(layer: int) -> str:
    """Name of layer ``layer``'s ``block_indices_begins.L`` input ([B*Hkv + 1] i32)."""
    return f"block_indices_begins.{layer}"


def to_per_head(model: ov.Model, sequence_major: bool = False) -> ov.Model:
    """Rewrite ``model`` in place to per-KV-head subsequences and return it (layout: module doc).

    ``model`` must come from ``to_paged`` / ``read_paged_model`` with score outputs. Raises
    :class:`PerHeadPatternError` when the graph does not match (no PagedAttention ops, missing
    rt_info, unsupported extension inputs, already converted, ...); every PagedAttention op is
    checked before anything is changed.
    """
    try:
        _core.to_per_head(model_address(model), sequence_major)
    except _core.PerHeadPatternError as err:
        raise PerHeadPatternError(str(err)) from None
    return model


@dataclass(frozen=True)
class PerHeadLayout:
    """Builds the per-head inputs of a :func:`to_per_head` model and splits its scores.

    ``num_layers`` / ``num_kv_heads`` as in the original model (see :meth:`from_model`).
    ``sequence_major``: subsequence ``j = s*Hkv + h`` (a model converted with
    ``sequence_major=True``, valid only for steps with one new token per sequence) instead of
    ``j = h*B + s``.
    """

    num_layers: int
    num_kv_heads: int
    sequence_major: bool = False

    @classmethod
    def from_model(cls, model: ov.Model) -> PerHeadLayout:
        """Read the layout recorded by :func:`to_per_head` in ``model``'s rt_info."""
        if not model.has_rt_info([_RT_KEY, "num_kv_heads"]):
            raise PerHeadPatternError("PerHeadLayout: the model was not converted by to_per_head")
        order = model.has_rt_info([_RT_KEY, "sequence_major"]) and bool(
            model.get_rt_info([_RT_KEY, "sequence_major"]).astype(bool))
        return cls(
            num_layers=int(model.get_rt_info([_RT_KEY, "num_layers"]).astype(int)),
            num_kv_heads=int(model.get_rt_info([_RT_KEY, "num_kv_heads"]).astype(int)),
            sequence_major=order,
        )

    def order(self, per_head: np.ndarray) -> np.ndarray:
        """[B, Hkv] (or [..., B, Hkv]) values -> [..., B*Hkv] in subsequence order ``j``."""
        a = np.asarray(per_head)
        if not self.sequence_major:
            a = np.swapaxes(a, -1, -2)
        return a.reshape(*a.shape[:-2], -1)

    def subsequence_begins(self, num_tokens: Sequence[int]) -> np.ndarray:
        """``head_subsequence_begins`` [B*Hkv + 1] for ``num_tokens`` [B] new tokens each."""
        n = np.asarray(num_tokens, dtype=np.int64)
        if self.sequence_major:
            if (n != 1).any():
                raise ValueError("a sequence-major per-head model takes one token per sequence, "
                                 f"got num_tokens={n.tolist()}")
            return np.arange(len(n) * self.num_kv_heads + 1, dtype=np.int32)
        total = int(n.sum())
        starts = np.concatenate([[0], np.cumsum(n)[:-1]]) if len(n) else n
        heads = np.arange(self.num_kv_heads, dtype=np.int64)[:, None] * total
        return np.append((heads + starts[None, :]).ravel(), self.num_kv_heads * total).astype(
            np.int32
        )

    def _past(self, past_lens: object, batch: int) -> np.ndarray:
        """Broadcast past lens ([B], [B, Hkv] or [L, B, Hkv]) to [L, B, Hkv]."""
        past = np.asarray(past_lens, dtype=np.int64)
        if past.ndim == 1:
            past = past[:, None]
        past = np.broadcast_to(past, (self.num_layers, batch, self.num_kv_heads))
        return past

    def context_lens(self, num_tokens: Sequence[int], past_lens: object) -> np.ndarray:
        """Context length [L, B, Hkv] of each (layer, sequence, head) after this step."""
        n = np.asarray(num_tokens, dtype=np.int64)
        return self._past(past_lens, len(n)) + n[None, :, None]

    def inputs(
        self,
        num_tokens: Sequence[int],
        past_lens: object,
        block_tables: Sequence[Sequence[Sequence[Sequence[int]]]],
    ) -> dict[str, np.ndarray]:
        """All per-head inputs of one step (everything except ids, positions and caches).

        num_tokens: [B] new tokens per sequence. past_lens: cached tokens, [B] (same in every
        layer and head), [B, Hkv] or [L, B, Hkv]. block_tables[L][s][h]: physical blocks (in the
        layer's per-head pool) of head ``h`` of sequence ``s``, covering its past + new tokens.
        Returns ``head_subsequence_begins``, ``max_context_len`` and per layer
        ``head_past_lens.L``, ``block_indices.L``, ``block_indices_begins.L`` (i32 arrays).
        """
        batch = len(num_tokens)
        past = self._past(past_lens, batch)
        ctx = self.context_lens(num_tokens, past)
        if len(block_tables) != self.num_layers:
            raise ValueError(
                f"block_tables: {len(block_tables)} layers, expected {self.num_layers}"
            )
        out: dict[str, np.ndarray] = {
            HEAD_SUBSEQUENCE_BEGINS: self.subsequence_begins(num_tokens),
            "max_context_len": np.asarray(int(ctx.max()) if ctx.size else 0, dtype=np.int32),
        }
        seqs, heads = np.meshgrid(np.arange(batch), np.arange(self.num_kv_heads), indexing="ij")
        pairs = list(zip(self.order(seqs).tolist(), self.order(heads).tolist(), strict=True))
        for layer, tables in enumerate(block_tables):
            if len(tables) != batch or any(len(t) != self.num_kv_heads for t in tables):
                raise ValueError(f"block_tables[{layer}] must be [B={batch}][Hkv] tables")
            flat: list[int] = []
            begins = [0]
            for s, h in pairs:
                flat.extend(tables[s][h])
                begins.append(len(flat))
            out[head_past_lens_name(layer)] = self.order(past[layer]).astype(np.int32)
            out[block_indices_name(layer)] = np.asarray(flat, dtype=np.int32)
            out[block_indices_begins_name(layer)] = np.asarray(begins, dtype=np.int32)
        return out

    def split_scores(self, scores: np.ndarray, context_lens: np.ndarray) -> list[list[np.ndarray]]:
        """Split one layer's ``scores.L`` into ``[s][h]`` arrays of ``context_lens[s, h]`` each.

        ``context_lens`` is [B, Hkv] (one layer of :meth:`context_lens`).
        """
        ctx = np.asarray(context_lens, dtype=np.int64)
        batch, heads = ctx.shape
        order = self.order(ctx)
        if int(order.sum()) != len(scores):
            raise ValueError(f"split_scores: {len(scores)} scores, expected {int(order.sum())}")
        offsets = np.concatenate([[0], np.cumsum(order)])
        j = self.order(np.arange(batch * heads).reshape(batch, heads))
        at = np.empty(batch * heads, dtype=np.int64)
        at[j] = np.arange(batch * heads)  # position in j order of the pair s*Hkv + h
        return [
            [scores[offsets[at[s * heads + h]]:offsets[at[s * heads + h] + 1]]
             for h in range(heads)]
            for s in range(batch)
        ]
