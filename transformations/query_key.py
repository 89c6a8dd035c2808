"""The queries and keys PagedAttention reads, as outputs of a per-head paged model.

KVzip ranks a cached token by the largest attention any single replay query gives it, while
PagedAttention's ``scores.L`` are sums over a step's scored queries. :func:`add_query_key` adds,
per decoder layer ``L``, the op's query and key inputs (after the rotary embedding) as outputs,
so that each query's own attention can be computed beside the step
(``kvcrush_ov/engine/query_scores.py``):

- ``attn_query.L`` f32 [Hkv*T, G*D]: in a head-major per-head graph (``to_per_head``) row
  ``h*T + t`` holds the ``G`` query heads of KV head ``h`` for token ``t`` of the step (tokens
  in input order), ``G*D`` wide (query head ``g`` at columns ``[g*D, (g+1)*D)``);
- ``attn_key.L`` f32 [Hkv*T, D]: the key of KV head ``h`` for token ``t`` at row ``h*T + t``.

The rewrite records the softmax scale the op applies (its ``scale`` input: a constant, or
``1/sqrt(D)`` when it is computed) in the model's rt_info (``kvcrush_query_key``, read back by
:func:`attention_scale`). Sliding-window attention is refused (the outputs could not say which
keys a query sees).
"""

from __future__ import annotations

import math

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from kvcrush_ov.transformations.per_head import PA_TYPE, PerHeadLayout

QUERY = "attn_query"
KEY = "attn_key"
_RT_KEY = "kvcrush_query_key"
_SCALE, _SLIDING_WINDOW = 9, 10


def query_name(layer: int) -> str:
    """Output name of layer ``layer``'s queries ([Hkv*T, G*D] f32)."""
    return f"{QUERY}.{layer}"


def key_name(layer: int) -> str:
    """Output name of layer ``layer``'s keys ([Hkv*T, D] f32)."""
    return f"{KEY}.{layer}"


def _layer_of(pa: ov.Node) -> int:
    port = pa.input_value(3)
    for name in port.get_names() | {port.get_node().get_friendly_name()}:
        if name.startswith("key_cache."):
            return int(name.split(".", 1)[1])
    raise ValueError(f"add_query_key: {pa.get_friendly_name()} reads no key_cache.<layer> input")


def _constant(port: ov.Output) -> np.ndarray | None:
    node = port.get_node()
    return node.get_data() if node.get_type_name() == "Constant" else None


def add_query_key(model: ov.Model) -> ov.Model:
    """Add ``attn_query.L`` / ``attn_key.L`` (module doc) to a head-major per-head ``model`` in
    place; returns it. ValueError for a sequence-major model, a model without PagedAttention,
    sliding-window attention or scales that differ between layers."""
    layout = PerHeadLayout.from_model(model)
    if layout.sequence_major:
        raise ValueError("add_query_key: the model is sequence-major (decode graph); the "
                         "head-major scored graph is needed")
    pas = [n for n in model.get_ordered_ops() if n.get_type_name() == PA_TYPE]
    if len(pas) != layout.num_layers:
        raise ValueError(f"add_query_key: {len(pas)} PagedAttention ops, the model has "
                         f"{layout.num_layers} layers")
    scales: set[float] = set()
    results = []
    for pa in pas:
        layer = _layer_of(pa)
        window = _constant(pa.input_value(_SLIDING_WINDOW))
        if window is not None and int(np.asarray(window).reshape(-1)[0]) != 0:
            raise ValueError(f"add_query_key: layer {layer} uses sliding-window attention")
        key = pa.input_value(1)
        dim = key.get_partial_shape()[-1]
        scale = _constant(pa.input_value(_SCALE))
        if scale is not None:
            scales.add(float(np.asarray(scale).reshape(-1)[0]))
        elif dim.is_static:
            scales.add(1.0 / math.sqrt(dim.get_length()))
        else:
            raise ValueError(f"add_query_key: layer {layer}: no constant scale and no static "
                             "head size")
        for port, name in ((pa.input_value(0), query_name(layer)), (key, key_name(layer))):
            if port.get_element_type() != ov.Type.f32:
                port = ops.convert(port, ov.Type.f32).output(0)
            res = ops.result(port)
            res.output(0).get_tensor().set_names({name})
            res.set_friendly_name(name)
            results.append(res)
    if len(scales) != 1:
        raise ValueError(f"add_query_key: attention scales {sorted(scales)}, expected one")
    model.add_results(results)
    model.set_rt_info(scales.pop(), [_RT_KEY, "scale"])
    return model


def attention_scale(model: ov.Model | ov.CompiledModel) -> float:
    """The softmax scale :func:`add_query_key` recorded in ``model``."""
    if isinstance(model, ov.CompiledModel):
        model = model.get_runtime_model()
    try:
        return float(model.get_rt_info([_RT_KEY, "scale"]).astype(float))
    except RuntimeError:
        raise ValueError("attention_scale: the model was not rewritten by add_query_key") from None
