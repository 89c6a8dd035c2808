"""FastKV's cut: a paged-attention model split at a layer's residual output into two models.

Token-Selective Propagation (FastKV, Jo et al. 2025) runs the whole prompt through layers
``0..L`` (the *front*), then only a chosen subset of its tokens through layers ``L+1..N-1`` (the
*back*), with their original position ids. :func:`split_at_layer` cuts a converted model
(:func:`kvcrush_ov.transformations.paged.to_paged`, optionally :func:`.per_head.to_per_head`)
there; the engine gathers the rows it propagates in between.

The cut point is the residual stream ``h_L`` ([T, 1, D], the output of decoder layer ``L``):
the stream starts at the token-embedding Gather and every decoder layer adds two residual
branches (attention, MLP), so ``h_L`` is the ``2L + 2``-th residual Add after the embedding.

- front: the model's parameters that layers ``0..L`` read; outputs ``hidden_states`` [T, 1, D]
  (``h_L``) and ``scores.l`` for ``l <= L`` where the model has them. No logits.
- back: a new ``hidden_states`` parameter [T', 1, D] in place of ``h_L``, plus the parameters
  layers ``L+1..`` and the head read (``position_ids`` for RoPE, the per-layer block tables and
  caches of those layers, ``logits_indices``...); outputs ``logits`` and ``scores.l`` for
  ``l > L``. Its shared paged-attention inputs (``head_subsequence_begins``,
  ``max_context_len``...) describe the back step's own (smaller) batch.

Both are ordinary ``ov.Model`` objects sharing no nodes with the input model (it is cloned),
without the input model's rt_info.

The cut is the C++ pass ``kvcrush::FastKVCut`` (``cpp/include/kvcrush/passes.hpp``), run through
``kvcrush_ov._core`` on two clones of the model.
"""

from __future__ import annotations

import openvino as ov

from kvcrush_ov import _core
from kvcrush_ov.transformations._native import model_address

HIDDEN = "hidden_states"


class FastKVPatternError(ValueError):
    """The model's residual stream does not have the decoder-layer shape this cut expects."""


def residual_stream(model: ov.Model) -> list[ov.Output]:
    """``[h_0, h_1, ...]``: the embedding ([T, 1, D]), then every residual Add's output in order
    (two per decoder layer); decoder layer ``l`` outputs ``stream[2 * l + 2]``."""
    try:
        stream = _core.fastkv_residual_stream(model_address(model))
    except _core.FastKVPatternError as err:
        raise FastKVPatternError(str(err)) from None
    nodes = {n.get_name(): n for n in model.get_ordered_ops()}
    return [nodes[name].output(index) for name, index in stream]


def num_layers(model: ov.Model) -> int:
    """Decoder layers of a paged model (its ``key_cache.*`` parameters)."""
    return int(_core.fastkv_num_layers(model_address(model)))


def split_at_layer(model: ov.Model, split_layer: int) -> tuple[ov.Model, ov.Model]:
    """(front, back) of ``model`` cut after decoder layer ``split_layer`` (module doc).

    ``split_layer`` in ``[0, N - 2]`` (the back part holds at least one layer), else ValueError;
    :class:`FastKVPatternError` when the residual stream does not match. ``model`` is unchanged.
    """
    parts = model.clone(), model.clone()
    for part, front in zip(parts, (True, False), strict=True):
        try:
            _core.fastkv_cut(model_address(part), split_layer, front)
        except _core.FastKVPatternError as err:
            raise FastKVPatternError(str(err)) from None
    return parts
