"""LESS decode attention in the per-KV-head paged graph (:mod:`kvcrush_ov.less.kernels`).

:func:`add_less` rewrites a model already converted by
:func:`kvcrush_ov.transformations.per_head.to_per_head` so that the attention output of the
tokens named by ``less_token_index`` mixes in the LESS state of their sequence (the tokens eviction
dropped). PagedAttention is unchanged (it writes the cache and computes the kept part); per layer::

    idx   = less_token_index [M] i32  (rows of this step's T tokens; M = 0: the graph is a no-op)
    out'  = LESSMix(query [T, Hq*D], out [T, Hq*Dv], idx, key_cache.L, head_past_lens.L,
                    block_indices.L, block_indices_begins.L, less_token_seq, less_token_offset,
                    scale, less_state_H.L, less_state_z.L, phi's w1, b1, w2, b2)
          = out with its rows idx mixed

``LESSMix`` (``kvcrush_ov.engine.less_op``, one kernel: ``kvcrush::less_mix``) computes the
log-sum-exp ``L`` of the logits over the kept keys from the cache, ``phi(q) = |gelu(gelu(q W1 +
b1) W2 + b2)|``, ``N, Z = phi . H[seq], phi . z[seq]`` (per KV head group) and
``a * kept + (1 - a) * N / Z`` with ``a = sigmoid(L - log Z)``, exactly 1 when ``Z = 0``. It runs
after PagedAttention wrote this step's keys (it reads PagedAttention's output).

Inputs added: ``less_token_index`` [M] i32, ``less_token_seq`` [M] i32 (sequence of each
selected token: the ``s`` of the per-head layout), ``less_token_offset`` [M] i32 (its index among
its sequence's new tokens of the step), and per layer ``less_state_H.L`` [B, Hkv, F, Dv] f32 and
``less_state_z.L`` [B, Hkv, F] f32. Only the weights' active layers
(:attr:`LESSWeights.active_layers`) get the op and the states: in a layer training switched
off, LESS is exactly PagedAttention, and each op costs decode time.

Because another op reads ``key_cache.L``, the plugin no longer types the cache parameters itself:
call :func:`set_cache_types` with the types and shapes the plain graph compiles to.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from kvcrush_ov.less.kernels import LESSWeights
from kvcrush_ov.transformations.per_head import (
    PA_TYPE,
    PerHeadLayout,
    block_indices_begins_name,
    block_indices_name,
    head_past_lens_name,
)

LESS_TOKEN_INDEX = "less_token_index"
LESS_TOKEN_SEQ = "less_token_seq"
LESS_TOKEN_OFFSET = "less_token_offset"
_RT_KEY = "kvcrush_less"
_Q, _KC, _SCALE = 0, 3, 9

class LESSNodes(Protocol):
    """Builds a layer's ``LESSMix`` node (module doc; ``kvcrush_ov.engine.less_op``)."""

    def mix(self, inputs: list[ov.Output], sequence_major: bool) -> ov.Node: ...



class LESSPatternError(RuntimeError):
    """The model does not have the per-head paged layout :func:`add_less` expects."""


def state_h_name(layer: int) -> str:
    return f"less_state_H.{layer}"


def state_z_name(layer: int) -> str:
    return f"less_state_z.{layer}"


def _params(model: ov.Model) -> dict[str, ov.Node]:
    return {n: p for p in model.get_parameters() for n in p.output(0).get_names()}


def _layer_of(pa: ov.Node) -> int:
    for name in pa.input_value(_KC).get_names():
        if name.startswith("key_cache."):
            return int(name.split(".", 1)[1])
    raise LESSPatternError(f"add_less: input 3 of {pa.get_friendly_name()} is not key_cache.L")


def _walk_back(value: ov.Output, prefix: str) -> ov.Output:
    """Through the per-head rewrite's reshapes / transposes named ``prefix...`` to their source."""
    while value.get_node().get_friendly_name().startswith(prefix):
        value = value.get_node().input_value(0)
    return value


def _merged_output(pa: ov.Node) -> ov.Output:
    """The per-head rewrite's ``[T, Hq*Dv]`` output of ``pa`` (its ``/per_head_out/merge``)."""
    tag = pa.get_friendly_name()
    value = pa.output(0)
    for _ in range(4):
        targets = list(value.get_target_inputs())
        if len(targets) != 1:
            break
        node = targets[0].get_node()
        if not node.get_friendly_name().startswith(f"{tag}/per_head_out"):
            break
        value = node.output(0)
        if node.get_friendly_name() == f"{tag}/per_head_out/merge":
            return value
    raise LESSPatternError(f"add_less: {tag} has no per-head output merge (run to_per_head first)")


def _f32(x: ov.Output) -> ov.Output:
    return x if x.get_element_type() == ov.Type.f32 else ops.convert(x, ov.Type.f32).output(0)


def _c(x: np.ndarray) -> ov.Output:
    return ops.constant(np.ascontiguousarray(x, dtype=np.float32)).output(0)


def add_less(model: ov.Model, weights: LESSWeights, nodes: LESSNodes) -> ov.Model:
    """Add LESS mixing (one ``nodes.mix`` op per layer) to every layer of a per-head paged
    ``model`` (in place; returns it)."""
    if model.has_rt_info([_RT_KEY, "feature_dim"]):
        raise LESSPatternError("add_less: the model already has LESS")
    if not model.has_rt_info(["kvcrush_per_head", "num_kv_heads"]):
        raise LESSPatternError("add_less: run to_per_head first")
    pas = [n for n in model.get_ordered_ops() if n.get_type_name() == PA_TYPE]
    params = _params(model)
    sequence_major = PerHeadLayout.from_model(model).sequence_major
    hq, hkv, d = weights.num_heads, weights.num_kv_heads, weights.head_dim
    f = weights.feature_dim
    if len(pas) != weights.num_layers:
        raise LESSPatternError(f"add_less: the model has {len(pas)} attention layers, the "
                               f"weights {weights.num_layers}")
    idx = ops.parameter([-1], ov.Type.i32, name=LESS_TOKEN_INDEX)
    seq = ops.parameter([-1], ov.Type.i32, name=LESS_TOKEN_SEQ)
    off = ops.parameter([-1], ov.Type.i32, name=LESS_TOKEN_OFFSET)
    new_params = [idx, seq, off]
    a = weights.arrays
    active = set(weights.active_layers)
    for pa in pas:
        layer = _layer_of(pa)
        if layer not in active:
            continue  # switched off: attention there is exactly PagedAttention's
        tag = pa.get_friendly_name()
        q = _walk_back(pa.input_value(_Q), f"{tag}/per_head_q")
        out = _merged_output(pa)
        width = q.get_partial_shape()[1]
        if width.is_dynamic or width.get_length() != hq * d:
            raise LESSPatternError(f"add_less: {tag}: query width {width}, the weights need "
                                   f"{hq}*{d}")
        dv = out.get_partial_shape()[1].get_length() // hq
        targets = list(out.get_target_inputs())
        tables = [params[head_past_lens_name(layer)].output(0),
                  params[block_indices_name(layer)].output(0),
                  params[block_indices_begins_name(layer)].output(0)]
        scale = ops.convert(pa.input_value(_SCALE), ov.Type.f32).output(0)
        h_state = ops.parameter([-1, hkv, f, dv], ov.Type.f32, name=state_h_name(layer))
        z_state = ops.parameter([-1, hkv, f], ov.Type.f32, name=state_z_name(layer))
        new_params += [h_state, z_state]
        mixed = nodes.mix([_f32(q), _f32(out), idx.output(0), pa.input_value(_KC), *tables,
                           seq.output(0), off.output(0), scale, h_state.output(0),
                           z_state.output(0), _c(a["q_w1"][layer]), _c(a["q_b1"][layer]),
                           _c(a["q_w2"][layer]), _c(a["q_b2"][layer])], sequence_major)
        new_out = mixed
        if out.get_element_type() != ov.Type.f32:
            new_out = ops.convert(mixed.output(0), out.get_element_type())
        new_out.set_friendly_name(f"{tag}/less_out")
        for t in targets:
            t.replace_source_output(new_out.output(0))
    for p in new_params:
        p.output(0).set_names({p.get_friendly_name()})
    model.add_parameters(new_params)
    model.set_rt_info(f, [_RT_KEY, "feature_dim"])
    model.validate_nodes_and_infer_types()
    return model


def set_cache_types(model: ov.Model, key_type: ov.Type, key_dims: list[int],
                    value_type: ov.Type, value_dims: list[int]) -> None:
    """Give every ``key_cache.L`` / ``value_cache.L`` parameter its compiled element type and
    ``[?, *dims]`` shape (the plugin leaves a cache read by another op untyped)."""
    for name, p in _params(model).items():
        if name.startswith("key_cache."):
            p.set_element_type(key_type)
            p.set_partial_shape(ov.PartialShape([-1, *key_dims]))
        elif name.startswith("value_cache."):
            p.set_element_type(value_type)
            p.set_partial_shape(ov.PartialShape([-1, *value_dims]))
    model.validate_nodes_and_infer_types()


def probe_cache_types(core: ov.Core, device: str, props: dict, head_dim: int, v_head_dim: int,
                      group: int = 1) -> tuple[ov.Type, list[int], ov.Type, list[int]]:
    """(key type, key dims, value type, value dims) the plugin gives a one-KV-head paged cache
    under ``props``: compiles a graph of a single PagedAttention op (milliseconds)."""
    from openvino.op import _PagedAttentionExtension

    def p(name: str, shape: list[int], t: ov.Type = ov.Type.f32) -> ov.Node:
        return ops.parameter(shape, t, name=name)

    i32 = ov.Type.i32
    params = [p("q", [-1, group * head_dim]), p("k", [-1, head_dim]), p("v", [-1, v_head_dim]),
              p("key_cache", [-1, -1, -1, -1], ov.Type.dynamic),
              p("value_cache", [-1, -1, -1, -1], ov.Type.dynamic),
              p("past_lens", [-1], i32), p("subsequence_begins", [-1], i32),
              p("block_indices", [-1], i32), p("block_indices_begins", [-1], i32)]
    empty_f = ops.constant(np.zeros(0, np.float32))
    empty_i = ops.constant(np.zeros(0, np.int32))
    args = [*params, ops.constant(np.float32(1.0)), ops.constant(np.int32(0)), empty_f,
            p("max_context_len", [], i32), empty_i, empty_i, empty_i,
            ops.constant(np.zeros(0, np.float32)), ops.constant(np.zeros(0, np.float32)),
            ops.constant(np.int32(0)), ops.constant(np.int32(0)),
            ops.constant(np.zeros((0, 0, 0, 0), np.float32)), ops.constant(np.int32(0)),
            empty_i, empty_i, empty_i, empty_i, ops.constant(np.zeros(0, np.uint8)), empty_i]
    pa = _PagedAttentionExtension([a.output(0) for a in args])
    rt = pa.get_rt_info()
    rt["num_k_heads"], rt["num_v_heads"] = 1, 1
    rt["k_head_size"], rt["v_head_size"] = head_dim, v_head_dim
    model = ov.Model([pa.output(0)], [params[i] for i in range(len(params))]
                     + [args[12]])
    compiled = core.compile_model(model, device, props)
    k, v = compiled.input("key_cache"), compiled.input("value_cache")
    return (k.get_element_type(), [d.get_length() for d in list(k.get_partial_shape())[1:]],
            v.get_element_type(), [d.get_length() for d in list(v.get_partial_shape())[1:]])
