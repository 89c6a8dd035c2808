"""Convert an optimum-exported stateful LLM IR into a paged-attention model.

Inputs after conversion (``T`` = scheduled tokens of all sequences, ``B`` = sequences):
``input_ids`` [T] i64, ``position_ids`` [T] i64, ``max_context_len`` [] i32, ``past_lens`` [B],
``subsequence_begins`` [B+1], ``block_indices_begins`` [B+1], ``block_indices`` [total blocks]
(all i32) and ``key_cache.L`` / ``value_cache.L`` per layer (dynamic before compile; the plugin
fixes every dim except the number of blocks, e.g. f32 ``[blocks, kv_heads, 32, head_dim]``).
With :func:`kvcrush_ov.transformations.logits.add_logits_indices` also ``logits_indices`` [N] i64.

Outputs: ``logits`` [T, 1, V] (or [N, 1, V] with ``logits_indices``) and, with score outputs,
``scores.L`` [context tokens of all sequences] per layer.

The converted model contains ``PagedAttentionExtension`` ops that cannot be serialized and read
back (``unsupported opset: extension``): keep the exported IR on disk and convert at load time
(the conversion takes milliseconds).

The conversion is the C++ pass ``kvcrush::ToPaged`` (``cpp/include/kvcrush/passes.hpp``:
OpenVINO's ``SDPAToPagedAttention`` with the flags below), run through ``kvcrush_ov._core``.
"""

from __future__ import annotations

import os

import openvino as ov

from kvcrush_ov import _core
from kvcrush_ov.transformations._native import model_address
from kvcrush_ov.transformations.logits import add_logits_indices


def to_paged(model: ov.Model, score_outputs: bool = True,
             score_aggregation: bool = False, per_layer_blocks: bool = False) -> ov.Model:
    """Rewrite ``model`` (stateful SDPA export) in place into a paged-attention model.

    ``score_outputs`` adds one ``scores.L`` output per layer (head-summed attention scores of each
    context token). ``score_aggregation`` adds the ``score_aggregation_window`` [B] i32 input: the
    scores are then summed over the last ``window[s]`` queries of each sequence in the step. The
    result cannot be serialized and read back: convert at load time. ``per_layer_blocks`` gives
    every layer its own ``block_indices.L`` input (``block_indices_begins`` stays shared, so
    every layer's table must have the same length per sequence).
    """
    _core.to_paged(model_address(model), score_outputs, score_aggregation, per_layer_blocks)
    return model


def read_paged_model(
    path: str | os.PathLike[str],
    score_outputs: bool = True,
    logits_indices: bool = True,
    score_aggregation: bool = False,
    per_layer_blocks: bool = False,
) -> ov.Model:
    """Read ``openvino_model.xml`` (or a folder holding it) and convert it to paged attention.

    With ``logits_indices`` the model gets the ``logits_indices`` [N] input and computes logits
    only for those tokens. The converted model cannot be serialized; call this at load time.
    """
    xml = os.fspath(path)
    if os.path.isdir(xml):
        xml = os.path.join(xml, "openvino_model.xml")
    model = to_paged(ov.Core().read_model(xml), score_outputs, score_aggregation,
                     per_layer_blocks)
    if logits_indices:
        add_logits_indices(model)
    return model
