"""Compute logits only for selected token positions of a paged-attention model.

After :func:`kvcrush_ov.transformations.paged.to_paged` the model computes ``lm_head`` for every
input token: the hidden states entering the ``lm_head`` MatMul have shape ``[T, 1, H]`` (``T`` =
total number of scheduled tokens of all sequences, ``H`` = hidden size) and the ``logits`` output
has shape ``[T, 1, V]`` (``V`` = vocabulary size). For a long prompt that projection costs as much
as the rest of the prefill.

:class:`LogitsIndicesPass` adds a Parameter ``logits_indices`` (``i64``, shape ``[N]``) and a
``Gather(hidden, logits_indices, axis=0)`` on the token axis directly before the ``lm_head``
MatMul, so that ``logits`` becomes ``[N, 1, V]``: row ``i`` holds the logits of token
``logits_indices[i]`` (an index into the flat ``[T]`` token axis; negative indices count from the
end, as Gather-8 defines).

The ``lm_head`` MatMul is found by walking up from the Result whose tensor is named ``logits``
through single-activation ops (Convert, Multiply / Divide / Add by a constant, Tanh, ...), which
covers output conversions and logit soft-capping. Any other layout raises
:class:`LogitsPatternError`.
"""

from __future__ import annotations

import openvino as ov
import openvino.opset13 as ops
from openvino.passes import Manager, ModelPass

LOGITS_NAME = "logits"
LOGITS_INDICES_NAME = "logits_indices"

# Ops that may sit between the lm_head MatMul and the logits Result (output casts, scaling,
# soft-capping). Each must have exactly one input that depends on a model Parameter.
_PASS_THROUGH = frozenset(
    {"Convert", "Multiply", "Divide", "Add", "Subtract", "Tanh", "Clamp", "Result"}
)
_MAX_WALK = 16


class LogitsPatternError(RuntimeError):
    """The model does not have the ``logits`` -> ``lm_head`` MatMul layout the pass expects."""


def _depends_on_parameter(value: ov.Output) -> bool:
    """Whether ``value`` is computed (transitively) from a model Parameter, i.e. is not a weight."""
    stack = [value.get_node()]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        key = node.get_instance_id()
        if key in seen:
            continue
        seen.add(key)
        if node.get_type_name() in ("Parameter", "ReadValue"):
            return True
        stack.extend(v.get_node() for v in node.input_values())
    return False


def _find_logits_result(model: ov.Model) -> ov.Node:
    for result in model.get_results():
        if LOGITS_NAME in result.output(0).get_names() or (
            LOGITS_NAME in result.input_value(0).get_names()
        ):
            return result
    names = sorted(n for o in model.outputs for n in o.get_names())
    raise LogitsPatternError(
        f"add_logits_indices: the model has no output named {LOGITS_NAME!r} (outputs: {names})"
    )


def find_lm_head(model: ov.Model) -> ov.Node:
    """Return the MatMul that produces the ``logits`` output (walking up from its Result)."""
    node = _find_logits_result(model)
    path = []
    for _ in range(_MAX_WALK):
        kind = node.get_type_name()
        path.append(f"{kind}({node.get_friendly_name()})")
        if kind == "MatMul":
            return node
        if kind not in _PASS_THROUGH:
            break
        activations = [v for v in node.input_values() if _depends_on_parameter(v)]
        if len(activations) != 1:
            break
        node = activations[0].get_node()
    raise LogitsPatternError(
        "add_logits_indices: could not find the lm_head MatMul above the 'logits' Result; "
        f"walked {' <- '.join(path)}"
    )


def _token_axis(hidden: ov.Output) -> int:
    """The token axis of the hidden states entering lm_head: 0 for the paged layout [T, 1, H]."""
    shape = hidden.get_partial_shape()
    paged = (
        shape.rank.is_static
        and shape.rank.get_length() in (2, 3)
        and shape[0].is_dynamic
        and shape[shape.rank.get_length() - 1].is_static
        and (shape.rank.get_length() == 2 or (shape[1].is_static and shape[1].get_length() == 1))
    )
    if not paged:
        raise LogitsPatternError(
            f"add_logits_indices: hidden states entering lm_head have shape {shape}; expected the "
            "paged-attention layout [T, 1, H] (run to_paged first)"
        )
    return 0


class LogitsIndicesPass(ModelPass):
    """Add ``logits_indices`` [N] (i64) and gather those tokens before the lm_head MatMul."""

    def run_on_model(self, model: ov.Model) -> bool:
        for param in model.get_parameters():
            if LOGITS_INDICES_NAME in param.output(0).get_names():
                raise LogitsPatternError(
                    f"add_logits_indices: the model already has an input {LOGITS_INDICES_NAME!r}"
                )
        lm_head = find_lm_head(model)
        # The hidden-state operand is the one computed from the inputs; the other is the weight.
        operands = [i for i in range(2) if _depends_on_parameter(lm_head.input_value(i))]
        if len(operands) != 1:
            raise LogitsPatternError(
                f"add_logits_indices: lm_head {lm_head.get_friendly_name()!r} has "
                f"{len(operands)} activation operands, expected 1"
            )
        port = lm_head.input(operands[0])
        hidden = port.get_source_output()
        axis = _token_axis(hidden)

        indices = ops.parameter([-1], ov.Type.i64, name=LOGITS_INDICES_NAME)
        indices.output(0).set_names({LOGITS_INDICES_NAME})
        gathered = ops.gather(
            hidden,
            indices,
            ops.constant(axis, ov.Type.i64),
            name=f"{lm_head.get_friendly_name()}/logits_indices_gather",
        )
        port.replace_source_output(gathered.output(0))
        model.add_parameters([indices])
        model.validate_nodes_and_infer_types()
        return True


def add_logits_indices(model: ov.Model) -> ov.Model:
    """Make ``logits`` [N, 1, V] for the token positions given by the new input ``logits_indices``.

    ``model`` must be a paged-attention model (see ``to_paged``); it is changed in place and
    returned. Raises :class:`LogitsPatternError` when no ``logits`` output fed by a MatMul on
    ``[T, 1, H]`` hidden states is found, or when ``logits_indices`` already exists.
    """
    manager = Manager()
    manager.register_pass(LogitsIndicesPass())
    manager.run_passes(model)
    return model
