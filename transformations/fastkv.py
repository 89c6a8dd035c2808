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

Both are ordinary ``ov.Model`` objects sharing no nodes with the input model (it is cloned).
"""

from __future__ import annotations

import openvino as ov
import openvino.opset13 as ops

HIDDEN = "hidden_states"


class FastKVPatternError(ValueError):
    """The model's residual stream does not have the decoder-layer shape this cut expects."""


def _consumers(out: ov.Output) -> list[ov.Node]:
    return [t.get_node() for t in out.get_target_inputs()]


def _embedding(model: ov.Model) -> ov.Output:
    """The token-embedding output: the first rank-3 float output reached from ``input_ids``."""
    start = [p for p in model.get_parameters() if p.get_friendly_name() == "input_ids"]
    if not start:
        raise FastKVPatternError("split_at_layer: the model has no input_ids parameter")
    frontier, seen = [start[0]], set()
    while frontier:
        node = frontier.pop(0)
        for n in _consumers(node.output(0)):
            if id(n) in seen:
                continue
            seen.add(id(n))
            out = n.output(0)
            if out.get_partial_shape().rank.get_length() == 3 and out.get_element_type().is_real():
                return out
            frontier.append(n)
    raise FastKVPatternError("split_at_layer: no embedding output found after input_ids")


def residual_stream(model: ov.Model) -> list[ov.Output]:
    """``[h_0, h_1, ...]``: the embedding, then every residual Add's output in order (two per
    decoder layer); decoder layer ``l`` outputs ``stream[2 * l + 2]``."""
    h = _embedding(model)
    stream = [h]
    while True:
        adds = [n for n in _consumers(h) if n.get_type_name() == "Add"
                and n.output(0).get_partial_shape() == h.get_partial_shape()]
        if not adds:
            return stream
        if len(adds) > 1:
            raise FastKVPatternError(f"split_at_layer: {len(adds)} residual Adds read "
                                     f"{h.get_node().get_friendly_name()}")
        h = adds[0].output(0)
        stream.append(h)


def num_layers(model: ov.Model) -> int:
    return sum(1 for p in model.get_parameters()
               if p.get_friendly_name().startswith("key_cache."))


def _layer_of_result(result: ov.Node) -> int | None:
    """L of a ``scores.L`` result, None for other results."""
    for name in result.output(0).get_names() | result.input_value(0).get_names():
        if name.startswith("scores."):
            return int(name.split(".", 1)[1])
    return None


def _is_logits(result: ov.Node) -> bool:
    return "logits" in (result.output(0).get_names() | result.input_value(0).get_names())


def _reachable_parameters(model: ov.Model, results: list[ov.Node]) -> list[ov.Node]:
    """``model``'s parameters that ``results`` depend on, in the model's order."""
    seen: set[str] = set()
    names: set[str] = set()
    stack = list(results)
    while stack:
        node = stack.pop()
        key = node.get_name()  # unique per node
        if key in seen:
            continue
        seen.add(key)
        if node.get_type_name() == "Parameter":
            names.add(node.get_name())
        stack.extend(v.get_node() for v in node.input_values())
    return [p for p in model.get_parameters() if p.get_name() in names]


def split_at_layer(model: ov.Model, split_layer: int) -> tuple[ov.Model, ov.Model]:
    """(front, back) of ``model`` cut after decoder layer ``split_layer`` (module doc).

    ``split_layer`` in ``[0, N - 2]`` (the back part holds at least one layer).
    """
    n = num_layers(model)
    if not 0 <= split_layer <= n - 2:
        raise ValueError(f"split_layer={split_layer}: must be in [0, {n - 2}] for a model of "
                         f"{n} layers")
    front_src, back_src = model.clone(), model.clone()
    cut = 2 * split_layer + 2

    stream = residual_stream(front_src)
    if len(stream) != 2 * n + 1:
        raise FastKVPatternError(f"split_at_layer: {len(stream) - 1} residual Adds for {n} "
                                 f"layers (expected {2 * n})")
    hidden = ops.result(stream[cut])
    hidden.output(0).set_names({HIDDEN})
    kept = [r for r in front_src.get_results()
            if (lay := _layer_of_result(r)) is not None and lay <= split_layer]
    front = ov.Model([hidden, *kept], _reachable_parameters(front_src, [hidden, *kept]),
                     "fastkv_front")

    stream = residual_stream(back_src)
    h = stream[cut]
    param = ops.parameter(h.get_partial_shape(), h.get_element_type(), HIDDEN)
    param.set_friendly_name(HIDDEN)
    param.output(0).set_names({HIDDEN})
    for target in list(h.get_target_inputs()):
        target.replace_source_output(param.output(0))
    kept = [r for r in back_src.get_results()
            if _is_logits(r) or ((lay := _layer_of_result(r)) is not None and lay > split_layer)]
    params = _reachable_parameters(back_src, kept)
    back = ov.Model(kept, [param, *params], "fastkv_back")
    for m in (front, back):
        m.validate_nodes_and_infer_types()
    return front, back
