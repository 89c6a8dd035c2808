"""Compute logits only for selected token positions of a paged-attention model.

After :func:`kvcrush_ov.transformations.paged.to_paged` the model computes ``lm_head`` for every
input token: the hidden states entering the ``lm_head`` MatMul have shape ``[T, 1, H]`` (``T`` =
total number of scheduled tokens of all sequences, ``H`` = hidden size) and the ``logits`` output
has shape ``[T, 1, V]`` (``V`` = vocabulary size). For a long prompt that projection costs as much
as the rest of the prefill.

:func:`add_logits_indices` adds a Parameter ``logits_indices`` (``i64``, shape ``[N]``) and a
``Gather(hidden, logits_indices, axis=0)`` on the token axis directly before the ``lm_head``
MatMul, so that ``logits`` becomes ``[N, 1, V]``: row ``i`` holds the logits of token
``logits_indices[i]`` (an index into the flat ``[T]`` token axis; negative indices count from the
end, as Gather-8 defines).

The ``lm_head`` MatMul is found by walking up from the Result whose tensor is named ``logits``
through single-activation ops (Convert, Multiply / Divide / Add by a constant, Tanh, ...), which
covers output conversions and logit soft-capping. Any other layout raises
:class:`LogitsPatternError`.

The rewrite is the C++ pass ``kvcrush::LogitsIndices`` (``cpp/include/kvcrush/passes.hpp``), run
through ``kvcrush_ov._core``.
"""

from __future__ import annotations

import openvino as ov

from kvcrush_ov import _core
from kvcrush_ov.transformations._native import model_address

LOGITS_NAME = "logits"
LOGITS_INDICES_NAME = "logits_indices"


class LogitsPatternError(RuntimeError):
    """The model does not have the ``logits`` -> ``lm_head`` MatMul layout the pass expects."""


def find_lm_head(model: ov.Model) -> ov.Node:
    """Return the MatMul that produces the ``logits`` output (walking up from its Result)."""
    try:
        name = _core.find_lm_head(model_address(model))
    except _core.LogitsPatternError as err:
        raise LogitsPatternError(str(err)) from None
    return next(n for n in model.get_ordered_ops() if n.get_name() == name)


def add_logits_indices(model: ov.Model) -> ov.Model:
    """Make ``logits`` [N, 1, V] for the token positions given by the new input ``logits_indices``.

    ``model`` must be a paged-attention model (see ``to_paged``); it is changed in place and
    returned. Raises :class:`LogitsPatternError` when no ``logits`` output fed by a MatMul on
    ``[T, 1, H]`` hidden states is found, or when ``logits_indices`` already exists.
    """
    try:
        _core.add_logits_indices(model_address(model))
    except _core.LogitsPatternError as err:
        raise LogitsPatternError(str(err)) from None
    return model
