"""``KeptLogSumExp``: the kept part's attention normaliser for LESS, an OpenVINO custom op.

PagedAttention returns only its normalised output; LESS needs ``L = logsumexp_i(scale q.k_i)``
over the keys a query sees in the cache. This op reads the keys straight from the cache tensor
(any precision :mod:`kvcrush_ov.engine.kv_codec` decodes; the plugin hands it the cache memory
itself, no copy) through the per-head block tables.

Inputs (see :mod:`kvcrush_ov.transformations.less`): 0 ``q`` f32 [M, Hq*D] (selected tokens),
1 ``key_cache.L`` (per-head pool ``[NB, 1, rows, cols]``), 2 ``head_past_lens.L`` [J],
3 ``block_indices.L``, 4 ``block_indices_begins.L`` [J+1], 5 ``less_token_seq`` [M],
6 ``less_token_offset`` [M], 7 ``scale`` [], 8 the PagedAttention output (ordering only).
``J = B * Hkv`` subsequences, head-major (``j = h*B + s``) or sequence-major (``j = s*Hkv + h``).
Output: f32 [M, Hq]: token ``m``, query head ``h*G + g`` -> the log-sum-exp over rows
``0 .. past[j] + offset[m]`` of subsequence ``j`` (its own key included, causal).
"""

from __future__ import annotations

import numpy as np
import openvino as ov

from kvcrush_ov.engine.kv_codec import CacheLayout


class KeptLogSumExp(ov.Op):
    """Log-sum-exp of ``scale * q . k`` over each selected token's cached keys (module doc)."""

    def __init__(self, inputs: list[ov.Output] | None = None, layout: CacheLayout | None = None,
                 num_kv_heads: int = 1, group: int = 1, sequence_major: bool = False) -> None:
        # set first: the base constructor validates (output shape). The layout is kept as plain
        # fields: the op outlives the interpreter's modules (a held C++ object would leak)
        self.geometry = None if layout is None else (layout.kind, layout.precision, layout.rows,
                                                     layout.cols, layout.block_size)
        self.num_kv_heads = num_kv_heads
        self.group = group
        self.sequence_major = sequence_major
        super().__init__(self, inputs)

    def validate_and_infer_types(self) -> None:
        heads = self.num_kv_heads * self.group
        self.set_output_type(0, ov.Type.f32, ov.PartialShape([-1, heads]))

    def clone_with_new_inputs(self, new_inputs: list[ov.Output]) -> KeptLogSumExp:
        return KeptLogSumExp(new_inputs, self._layout(), self.num_kv_heads, self.group,
                             self.sequence_major)

    def _layout(self) -> CacheLayout | None:
        return None if self.geometry is None else CacheLayout.from_shape(*self.geometry)

    def has_evaluate(self) -> bool:
        return True

    def evaluate(self, outputs: list[ov.Tensor], inputs: list[ov.Tensor]) -> bool:
        q = np.asarray(inputs[0].data, dtype=np.float32)
        m = q.shape[0]
        hkv, g = self.num_kv_heads, self.group
        outputs[0].set_shape([m, hkv * g])
        if m == 0:
            return True
        out = outputs[0].data
        layout = self._layout()
        d = layout.head_dim
        blocks = layout.head_blocks(inputs[1])
        past = np.asarray(inputs[2].data)
        table = np.asarray(inputs[3].data)
        begins = np.asarray(inputs[4].data)
        seq = np.asarray(inputs[5].data)
        off = np.asarray(inputs[6].data)
        scale = float(np.asarray(inputs[7].data))
        b = len(past) // hkv
        for s in np.unique(seq):
            mine = np.flatnonzero(seq == s)  # this sequence's selected tokens
            ends = np.asarray(off[mine], np.int64) + 1  # rows each sees past the cached ones
            for h in range(hkv):
                j = int(s) * hkv + h if self.sequence_major else h * b + int(s)
                cached = int(past[j])
                keys = layout.table_rows(blocks, table[begins[j]:begins[j + 1]],
                                         cached + int(ends.max()))  # [n, D], decoded once
                qs = q[mine, h * g * d:(h + 1) * g * d].reshape(len(mine) * g, d)
                logits = (keys @ qs.T) * scale  # [n, tokens * G]
                limit = np.repeat(cached + ends, g)  # causal: row < cached + offset + 1
                logits[np.arange(len(keys))[:, None] >= limit[None, :]] = -np.inf
                top = logits.max(axis=0)
                lse = top + np.log(np.exp(logits - top).sum(axis=0))
                out[mine, h * g:(h + 1) * g] = lse.reshape(len(mine), g)
        return True
