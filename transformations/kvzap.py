"""KVzap's surrogate scores as outputs of a paged-attention model.

:func:`add_kvzap` adds one output, ``kvzap`` f32 [L, T, 1, Hkv]: per decoder layer ``l``::

    kvzap[l] = x_l @ weight[l] + bias[l]                                  (linear), or
    kvzap[l] = gelu(x_l @ weight[l] + bias[l]) @ weight2[l] + bias2[l]    (MLP, erf GELU)
             [+ x_l @ skip[l]]                                            (residual MLP)

where ``x_l`` [T, 1, D] is the normalised hidden state the layer's attention reads (the input
of its value projection: the MatMul found by walking up from PagedAttention's value input
through Reshape / Transpose / Add / Convert). ``T`` is the step's tokens, in input order. The
outputs are the log importance the surrogate predicts for each token's key (kvzap/train.py).
The linear map costs ``D * Hkv`` multiply-adds per layer and token (SmolLM2: 0.07% of a
token's forward), an MLP of width ``Y`` about ``D * Y`` (Y = 128: 1.6%; its skip
``D * Hkv`` more).
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops

#: the output's name: f32 [L, T, 1, Hkv], layer ``l``'s predictions at ``[l]``
OUTPUT = "kvzap"
_PASS_THROUGH = ("Reshape", "Transpose", "Add", "Convert", "Squeeze", "Unsqueeze")


def _layer_of(pa: ov.Node) -> int:
    for name in pa.input_value(3).get_names() | {pa.input_value(3).get_node().get_friendly_name()}:
        if name.startswith("key_cache."):
            return int(name.split(".", 1)[1])
    raise ValueError(f"add_kvzap: {pa.get_friendly_name()} reads no key_cache.<layer> input")


def _attention_input(pa: ov.Node) -> ov.Output:
    """``x_l``: the data input of the value projection that feeds ``pa``'s value input."""
    node = pa.input_value(2).get_node()
    for _ in range(16):
        kind = node.get_type_name()
        if kind == "MatMul":
            return node.input_value(0)
        if kind not in _PASS_THROUGH:
            break
        ins = [node.input_value(i) for i in range(node.get_input_size())]
        data = [i for i in ins if i.get_node().get_type_name() != "Constant"]
        node = data[0].get_node()
    raise ValueError(f"add_kvzap: no value projection found above {pa.get_friendly_name()} "
                     f"(stopped at a {node.get_type_name()})")


def add_kvzap(model: ov.Model, weight: np.ndarray, bias: np.ndarray,
              weight2: np.ndarray | None = None, bias2: np.ndarray | None = None,
              skip: np.ndarray | None = None) -> ov.Model:
    """Add the ``kvzap`` output (module doc) in place; returns ``model``. ``weight`` f32
    [L, D, Hkv], ``bias`` [L, Hkv]; with ``weight2`` [L, Y, Hkv] and ``bias2`` [L, Hkv] an MLP:
    ``gelu(x @ weight + bias) @ weight2 + bias2`` (``weight`` [L, D, Y], ``bias`` [L, Y]),
    plus ``x @ skip`` with ``skip`` [L, D, Hkv]. ValueError when they do not fit the model's
    layers."""
    pas = [n for n in model.get_ordered_ops() if n.get_type_name() == "PagedAttentionExtension"]
    if len(pas) != weight.shape[0]:
        raise ValueError(f"add_kvzap: {weight.shape[0]} layers of weights, the model has "
                         f"{len(pas)} attention layers")
    per_layer: dict[int, ov.Output] = {}
    for pa in pas:
        layer = _layer_of(pa)
        x = _attention_input(pa)
        dim = x.get_partial_shape()[-1]
        if dim.is_static and dim.get_length() != weight.shape[1]:
            raise ValueError(f"add_kvzap: layer {layer} reads width {dim.get_length()}, the "
                             f"weights {weight.shape[1]}")
        if x.get_element_type() != ov.Type.f32:
            x = ops.convert(x, ov.Type.f32).output(0)
        w = ops.constant(np.ascontiguousarray(weight[layer], np.float32))
        b = ops.constant(np.ascontiguousarray(bias[layer], np.float32))
        y = ops.add(ops.matmul(x, w, False, False), b)
        if weight2 is not None:
            y = ops.gelu(y, "erf")
            w2 = ops.constant(np.ascontiguousarray(weight2[layer], np.float32))
            b2 = ops.constant(np.ascontiguousarray(bias2[layer], np.float32))
            y = ops.add(ops.matmul(y, w2, False, False), b2)
            if skip is not None:
                ws = ops.constant(np.ascontiguousarray(skip[layer], np.float32))
                y = ops.add(y, ops.matmul(x, ws, False, False))
        per_layer[layer] = ops.unsqueeze(y, ops.constant(np.array([0], np.int64))).output(0)
    if sorted(per_layer) != list(range(len(pas))):
        raise ValueError(f"add_kvzap: key_cache layers {sorted(per_layer)}, expected "
                         f"0..{len(pas) - 1}")
    res = ops.result(ops.concat([per_layer[layer] for layer in range(len(pas))], 0))
    res.output(0).get_tensor().set_names({OUTPUT})
    res.set_friendly_name(OUTPUT)
    model.add_results([res])
    return model
