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

(``query`` is the per-head rewrite's input, ``out`` its ``<pa>/per_head_out/merge``; both are
converted to f32 for the op when they are not, and its output back to ``out``'s type; the node
replacing ``out`` is named ``<pa>/less_out``.)

``LESSMix`` (C++ op ``kvcrush::LESSMixOp``, cpp/include/kvcrush/less_mix_op.hpp, one kernel:
``kvcrush::less_mix``) computes the log-sum-exp ``L`` of the logits over the kept keys, read
straight from the cache tensor (every format :mod:`kvcrush_ov.engine.kv_codec` decodes; the
plugin hands it the cache memory itself, no copy) through the per-head block tables, ``phi(q) =
|gelu(gelu(q W1 + b1) W2 + b2)|``, ``N, Z = phi . H[seq], phi . z[seq]`` (per KV head group) and
``a * kept + (1 - a) * N / Z`` with ``a = sigmoid(L - log Z)``, exactly 1 when ``Z = 0``. It runs
after PagedAttention wrote this step's keys (it reads PagedAttention's output). Its code is
part of ``kvcrush_ov._core`` (loaded for the whole process, so no node or compiled model can
outlive it); the CPU plugin runs it natively, no call into Python per layer and step.

The op's inputs: 0 ``q`` f32 [T, Hq*D] (every token of the step), 1 the kept output f32
[T, Hq*Dv], 2 ``less_token_index`` i32 [M] (the rows to mix), 3 ``key_cache.L`` (per-head pool
``[NB, 1, rows, cols]``), 4 ``head_past_lens.L`` [J], 5 ``block_indices.L``,
6 ``block_indices_begins.L`` [J+1], 7 ``less_token_seq`` [M], 8 ``less_token_offset`` [M],
9 ``scale`` [], 10 ``less_state_H.L`` [B, Hkv, F, Dv], 11 ``less_state_z.L`` [B, Hkv, F],
12..15 phi's w1 [Hq, D, Y], b1 [Hq, Y], w2 [Hq, Y, F], b2 [Hq, F]. ``J = B * Hkv`` subsequences,
head-major (``j = h*B + s``) or sequence-major (``j = s*Hkv + h``); token ``m`` sees rows
``0 .. past[j] + offset[m]`` of subsequence ``j`` (its own key included, causal). Output: f32
[T, Hq*Dv], input 1 with its rows ``idx`` mixed (one op per layer selects the rows too: every op
of a decode step costs a dispatch). Attributes: ``num_kv_heads``, ``group``, ``sequence_major``
and the key cache's format (:func:`key_format`).

Inputs added: ``less_token_index`` [M] i32, ``less_token_seq`` [M] i32 (sequence of each
selected token: the ``s`` of the per-head layout), ``less_token_offset`` [M] i32 (its index among
its sequence's new tokens of the step), and per layer ``less_state_H.L`` [B, Hkv, F, Dv] f32 and
``less_state_z.L`` [B, Hkv, F] f32. Only the weights' active layers
(:attr:`LESSWeights.active_layers`) get the op and the states: in a layer training switched
off, LESS is exactly PagedAttention, and each op costs decode time. The model's rt_info gets
``kvcrush_less/feature_dim``.

Because another op reads ``key_cache.L``, the plugin no longer types the cache parameters itself:
call :func:`set_cache_types` with the types and shapes the plain graph compiles to
(:func:`probe_cache_types`).

The rewrites are the C++ passes ``kvcrush::AddLESS`` and ``kvcrush::SetCacheTypes``
(``cpp/include/kvcrush/passes.hpp``), run through ``kvcrush_ov._core``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from kvcrush_ov import _core
from kvcrush_ov.less.kernels import LESSWeights
from kvcrush_ov.transformations._native import model_address

if TYPE_CHECKING:
    from kvcrush_ov.engine.kv_codec import CacheLayout

LESS_TOKEN_INDEX = "less_token_index"
LESS_TOKEN_SEQ = "less_token_seq"
LESS_TOKEN_OFFSET = "less_token_offset"
_FORMATS = {"f32": 1, "f16": 2, "bf16": 3}  # kvcrush::KeyFormat of plain key rows


class LESSPatternError(RuntimeError):
    """The model does not have the per-head paged layout :func:`add_less` expects."""


def state_h_name(layer: int) -> str:
    """Name of layer ``layer``'s ``less_state_H.L`` input ([B, Hkv, F, Dv] f32)."""
    return f"less_state_H.{layer}"


def state_z_name(layer: int) -> str:
    """Name of layer ``layer``'s ``less_state_z.L`` input ([B, Hkv, F] f32)."""
    return f"less_state_z.{layer}"


def key_format(key_layout: CacheLayout) -> int:
    """``kvcrush::KeyFormat`` of a key cache: 0 by channel (u8 / u4), 1 f32, 2 f16, 3 bf16."""
    return 0 if key_layout.by_channel else _FORMATS[key_layout.precision]


def add_less(model: ov.Model, weights: LESSWeights, key_layout: CacheLayout) -> ov.Model:
    """Add LESS mixing (one ``LESSMix`` op per active layer; module doc) to a per-head paged
    ``model`` (in place; returns it). ``key_layout``: the compiled key cache's head-block
    format (``CacheLayout.from_shape`` of :func:`probe_cache_types`'s key type and dims).

    Raises :class:`LESSPatternError` naming the node when the graph does not match (not per-head,
    LESS already added, layer count or query width unlike the weights'); every layer is checked
    before anything is changed.
    """
    a = weights.arrays

    def f32(name: str) -> np.ndarray:
        return np.ascontiguousarray(a[name], dtype=np.float32)

    try:
        _core.add_less(model_address(model), weights.num_kv_heads, list(weights.active_layers),
                       f32("q_w1"), f32("q_b1"), f32("q_w2"), f32("q_b2"),
                       key_format(key_layout), key_layout.native)
    except _core.LESSPatternError as err:
        raise LESSPatternError(str(err)) from None
    return model


def less_mix_model(params: list[ov.Node], key_layout: CacheLayout, num_kv_heads: int,
                   group: int, sequence_major: bool) -> ov.Model:
    """A model of one ``LESSMix`` op over ``params`` (its 16 inputs in order, module doc) and
    one output, for testing or timing the op alone; ``model.get_results()[0]`` reads the op."""
    model = ov.Model([ops.result(params[1])], params, "less_mix")
    _core.less_mix_model(model_address(model), num_kv_heads, group, sequence_major,
                         key_format(key_layout), key_layout.native)
    return model


def set_cache_types(model: ov.Model, key_type: ov.Type, key_dims: list[int],
                    value_type: ov.Type, value_dims: list[int]) -> None:
    """Give every ``key_cache.L`` / ``value_cache.L`` parameter its compiled element type and
    ``[?, *dims]`` shape (the plugin leaves a cache read by another op untyped)."""
    _core.set_cache_types(model_address(model), key_type.get_type_name(),
                          [int(d) for d in key_dims], value_type.get_type_name(),
                          [int(d) for d in value_dims])


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
