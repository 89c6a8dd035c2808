"""The C++ graph passes (``cpp/include/kvcrush/passes.hpp``) behind ``transformations/``.

Checks the rewritten graphs against what the docstrings promise (op counts, input names, node
names, rt_info), that errors reach Python as the modules' own exception types naming the node,
that a rejected model is left unchanged, FastKV's cut (the parts' layers, inputs and outputs),
LESS's mixing ops (one per active layer, their 16 inputs and attributes), and the guards of
the ``ov.Model`` handoff to C++. tiny-random-llama: 4 layers, 2 KV heads, 8 query heads of 32.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from kvcrush_ov import _core
from kvcrush_ov.engine.kv_codec import KEY, CacheLayout
from kvcrush_ov.less.kernels import LESSWeights
from kvcrush_ov.transformations._native import model_address
from kvcrush_ov.transformations.fastkv import (
    HIDDEN,
    FastKVPatternError,
    num_layers,
    residual_stream,
    split_at_layer,
)
from kvcrush_ov.transformations.less import (
    LESS_TOKEN_INDEX,
    LESS_TOKEN_OFFSET,
    LESS_TOKEN_SEQ,
    LESSPatternError,
    add_less,
    less_mix_model,
    set_cache_types,
    state_h_name,
    state_z_name,
)
from kvcrush_ov.transformations.logits import LOGITS_INDICES_NAME, find_lm_head
from kvcrush_ov.transformations.paged import read_paged_model
from kvcrush_ov.transformations.per_head import (
    HEAD_SUBSEQUENCE_BEGINS,
    PA_TYPE,
    PerHeadLayout,
    PerHeadPatternError,
    block_indices_begins_name,
    block_indices_name,
    head_past_lens_name,
    to_per_head,
)

LAYERS, KV_HEADS, HEADS, HEAD_DIM = 4, 2, 8, 32  # tiny-random-llama
SHARED_OLD = {"past_lens", "subsequence_begins", "block_indices", "block_indices_begins"}


def _inputs(model: ov.Model) -> set[str]:
    return {n for i in model.inputs for n in i.get_names()}


def _ops(model: ov.Model) -> Counter[str]:
    return Counter(n.get_type_name() for n in model.get_ordered_ops())


def _pas(model: ov.Model) -> list[ov.Node]:
    return [n for n in model.get_ordered_ops() if n.get_type_name() == PA_TYPE]


def _rt(node: ov.Node, key: str) -> int:
    return int(node.get_rt_info()[key].astype(int))


def _less_weights(head_dim: int = HEAD_DIM) -> LESSWeights:
    """Random LESS weights for tiny-random-llama with layer 0 switched off (k_s1 = 0)."""
    w = LESSWeights.initial(LAYERS, HEADS, KV_HEADS, head_dim, hidden=6, feature_dim=4, seed=2)
    w.arrays["k_s1"][:] = 1.0
    w.arrays["k_s1"][0] = 0.0
    return w


F32_KEYS = CacheLayout.from_shape(KEY, "f32", 32, HEAD_DIM)
U8_KEYS = CacheLayout.from_shape(KEY, "u8", 32 + 8, HEAD_DIM)  # by channel: 8 header rows


# ---------------------------------------------------------------- what the docstrings promise


def test_paged_model_inputs_and_ops(tiny_model: Path) -> None:
    plain = read_paged_model(tiny_model, logits_indices=False)
    assert _ops(plain)[PA_TYPE] == LAYERS
    assert {"input_ids", "position_ids", "max_context_len", *SHARED_OLD} <= _inputs(plain)
    for layer in range(LAYERS):
        assert {f"key_cache.{layer}", f"value_cache.{layer}"} <= _inputs(plain)
    with_indices = read_paged_model(tiny_model)
    assert _inputs(with_indices) == _inputs(plain) | {LOGITS_INDICES_NAME}
    # exactly one Gather added, named after the lm_head MatMul, feeding it
    added = _ops(with_indices) - _ops(plain)
    assert added == Counter({"Gather": 1, "Parameter": 1, "Constant": 1}), added
    lm_head = find_lm_head(with_indices)
    gather = lm_head.input_value(0).get_node()
    assert gather.get_friendly_name() == f"{lm_head.get_friendly_name()}/logits_indices_gather"


@pytest.mark.parametrize("sequence_major", [False, True])
def test_per_head_graph(tiny_model: Path, sequence_major: bool) -> None:
    plain = read_paged_model(tiny_model)
    before_inputs, before_ops = _inputs(plain), _ops(plain)
    model = to_per_head(read_paged_model(tiny_model), sequence_major=sequence_major)

    per_layer = {f(layer) for layer in range(LAYERS)
                 for f in (head_past_lens_name, block_indices_name, block_indices_begins_name)}
    assert _inputs(model) == (before_inputs - SHARED_OLD) | {HEAD_SUBSEQUENCE_BEGINS} | per_layer
    for p in model.get_parameters():
        if p.get_friendly_name() in per_layer | {HEAD_SUBSEQUENCE_BEGINS}:
            assert p.get_element_type() == ov.Type.i32
            assert p.get_partial_shape().rank.get_length() == 1

    counts = _ops(model)
    assert counts[PA_TYPE] == LAYERS  # one PagedAttention op per layer is kept
    # q, k, v: Reshape (+ Transpose + Reshape), out: Reshape (+ Transpose + Reshape)
    transposes = 0 if sequence_major else 4 * LAYERS
    reshapes = 4 * LAYERS if sequence_major else 8 * LAYERS
    assert counts["Transpose"] - before_ops["Transpose"] == transposes
    assert counts["Reshape"] - before_ops["Reshape"] == reshapes

    for pa in _pas(model):
        tag = pa.get_friendly_name()
        assert (_rt(pa, "num_k_heads"), _rt(pa, "num_v_heads")) == (1, 1)
        for i, part in enumerate("qkv"):
            src = pa.input_value(i).get_node()
            assert src.get_type_name() == "Reshape"
            assert src.get_friendly_name() == f"{tag}/per_head_{part}/rows"
            upstream = src.input_value(0).get_node()
            if sequence_major:  # a plain reshape of the original [T, heads*width] input
                assert not upstream.get_friendly_name().startswith(f"{tag}/per_head_")
            else:
                assert upstream.get_type_name() == "Transpose"
                assert upstream.get_friendly_name() == f"{tag}/per_head_{part}/heads_first"
        (target,) = pa.output(0).get_target_inputs()
        first = target.get_node()
        if sequence_major:
            assert first.get_type_name() == "Reshape"
            assert first.get_friendly_name() == f"{tag}/per_head_out/merge"
            assert all(t.get_node().get_type_name() != "Transpose"
                       for t in first.output(0).get_target_inputs())
        else:
            assert first.get_friendly_name() == f"{tag}/per_head_out/split"
        assert pa.input_value(6).get_names() == {HEAD_SUBSEQUENCE_BEGINS}
        layer = int(next(iter(pa.input_value(3).get_names())).split(".")[1])
        assert pa.input_value(5).get_names() == {head_past_lens_name(layer)}
        assert pa.input_value(7).get_names() == {block_indices_name(layer)}
        assert pa.input_value(8).get_names() == {block_indices_begins_name(layer)}

    assert PerHeadLayout.from_model(model) == PerHeadLayout(LAYERS, KV_HEADS, sequence_major)
    assert model.get_rt_info(["kvcrush_per_head", "num_layers"]).astype(int) == LAYERS


def test_per_head_model_compiles_with_tiled_window(tiny_model: Path) -> None:
    from openvino._offline_transformations import paged_attention_transformation

    model = ov.Core().read_model(tiny_model / "openvino_model.xml")
    paged_attention_transformation(model, False, True, True, False, False, False, False)
    to_per_head(model)
    tiles = [n for n in model.get_ordered_ops() if n.get_type_name() == "Tile"]
    assert sorted(t.get_friendly_name() for t in tiles) == sorted(
        f"{pa.get_friendly_name()}/window_tile" for pa in _pas(model))
    assert "score_aggregation_window" in _inputs(model)
    ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


@pytest.mark.parametrize("split_layer", [0, 2])
def test_fastkv_parts(tiny_model: Path, split_layer: int) -> None:
    model = to_per_head(read_paged_model(tiny_model, score_aggregation=True))
    inputs, counts = _inputs(model), _ops(model)
    front, back = split_at_layer(model, split_layer)
    assert _inputs(model) == inputs and _ops(model) == counts  # the input model is unchanged
    front_layers, back_layers = range(split_layer + 1), range(split_layer + 1, LAYERS)

    def layers_of(part: ov.Model) -> list[int]:
        return [int(next(iter(pa.input_value(3).get_names())).split(".")[1]) for pa in _pas(part)]

    assert layers_of(front) == list(front_layers) and layers_of(back) == list(back_layers)
    assert front.get_friendly_name() == "fastkv_front"
    assert back.get_friendly_name() == "fastkv_back"
    assert [o.get_names() for o in front.outputs] == [
        {HIDDEN}, *({f"scores.{layer}"} for layer in front_layers)]
    assert {n for o in back.outputs for n in o.get_names()} == {
        "logits", *(f"scores.{layer}" for layer in back_layers)}
    # front: the hidden result reads the last residual Add of layer split_layer
    hidden = front.outputs[0].get_node().input_value(0)
    assert hidden.get_node().get_type_name() == "Add"
    assert hidden.get_partial_shape().rank.get_length() == 3
    # back: hidden_states is its first parameter, of that shape, and feeds the next layer's Add
    param = back.get_parameters()[0]
    assert param.get_friendly_name() == HIDDEN and param.output(0).get_names() == {HIDDEN}
    assert param.get_partial_shape() == hidden.get_partial_shape()
    assert "Add" in {t.get_node().get_type_name() for t in param.output(0).get_target_inputs()}
    # each part reads exactly its layers' tables and caches
    for part, own, other in ((front, front_layers, back_layers), (back, back_layers, front_layers)):
        names = _inputs(part)
        for layer in own:
            assert {f"key_cache.{layer}", head_past_lens_name(layer)} <= names
        for layer in other:
            assert not {f"key_cache.{layer}", head_past_lens_name(layer)} & names
        assert {"position_ids", HEAD_SUBSEQUENCE_BEGINS, "max_context_len"} <= names
    assert "input_ids" in _inputs(front) and "input_ids" not in _inputs(back)
    assert "logits_indices" in _inputs(back) and "logits_indices" not in _inputs(front)
    # the model's per-head rt_info is not carried into the parts
    assert list(front.get_rt_info().keys()) == list(back.get_rt_info().keys()) == []
    assert model.has_rt_info(["kvcrush_per_head", "num_kv_heads"])
    assert _ops(front)[PA_TYPE] + _ops(back)[PA_TYPE] == LAYERS
    ov.Core().compile_model(back, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


@pytest.mark.parametrize(("sequence_major", "keys"), [(False, F32_KEYS), (True, U8_KEYS)])
def test_less_graph(tiny_model: Path, sequence_major: bool, keys: CacheLayout) -> None:
    w = _less_weights()
    model = to_per_head(read_paged_model(tiny_model), sequence_major=sequence_major)
    before_inputs, before_ops = _inputs(model), _ops(model)
    set_cache_types(model, ov.Type.u8 if keys.by_channel else ov.Type.f32, [1, 40, 32],
                    ov.Type.f32, [1, 32, 32])
    add_less(model, w, keys)
    active = [1, 2, 3]
    assert w.active_layers == active
    states = {f(layer) for layer in active for f in (state_h_name, state_z_name)}
    assert _inputs(model) == before_inputs | {LESS_TOKEN_INDEX, LESS_TOKEN_SEQ,
                                              LESS_TOKEN_OFFSET} | states
    added = _ops(model) - before_ops
    # per active layer: the op, a Convert of scale, 4 weight Constants, 2 state Parameters
    assert added == Counter({"LESSMix": 3, "Convert": 3, "Constant": 12, "Parameter": 9}), added
    assert model.get_rt_info(["kvcrush_less", "feature_dim"]).astype(int) == w.feature_dim
    y, f = w.arrays["q_w1"].shape[-1], w.feature_dim
    for pa in _pas(model):
        tag = pa.get_friendly_name()
        layer = int(next(iter(pa.input_value(3).get_names())).split(".")[1])
        merge = next(n for n in model.get_ordered_ops()
                     if n.get_friendly_name() == f"{tag}/per_head_out/merge")
        readers = [t.get_node() for t in merge.output(0).get_target_inputs()]
        if layer not in active:  # switched off: PagedAttention's output is used as it is
            assert all(r.get_type_name() != "LESSMix" for r in readers)
            continue
        (mix,) = readers
        assert mix.get_type_name() == "LESSMix" and mix.get_friendly_name() == f"{tag}/less_out"
        src = [v.get_node() for v in mix.input_values()]
        assert len(src) == 16
        # input 0: the query before the per-head rewrite
        assert not src[0].get_friendly_name().startswith(f"{tag}/per_head_q")
        assert pa.input_value(0).get_node().get_friendly_name() == f"{tag}/per_head_q/rows"
        names = [next(iter(v.get_names()), None) for v in mix.input_values()]
        assert names[2:9] == [LESS_TOKEN_INDEX, f"key_cache.{layer}", head_past_lens_name(layer),
                              block_indices_name(layer), block_indices_begins_name(layer),
                              LESS_TOKEN_SEQ, LESS_TOKEN_OFFSET]
        assert src[9].get_type_name() == "Convert" and src[9].input_value(0) == pa.input_value(9)
        assert names[10:12] == [state_h_name(layer), state_z_name(layer)]
        assert mix.get_input_partial_shape(10) == ov.PartialShape([-1, KV_HEADS, f, HEAD_DIM])
        for i, name, shape in ((12, "q_w1", [HEADS, HEAD_DIM, y]), (13, "q_b1", [HEADS, y]),
                               (14, "q_w2", [HEADS, y, f]), (15, "q_b2", [HEADS, f])):
            assert src[i].get_type_name() == "Constant"
            np.testing.assert_array_equal(src[i].get_data(), w.arrays[name][layer])
            assert list(src[i].get_output_shape(0)) == shape
        attrs = mix.get_attributes()
        assert (attrs["num_kv_heads"], attrs["group"], attrs["sequence_major"]) == (
            KV_HEADS, HEADS // KV_HEADS, sequence_major)
        assert (attrs["format"], attrs["by_channel"]) == ((0, True) if keys.by_channel
                                                          else (1, False))
        assert attrs["head_block_bytes"] == keys.native.head_block_bytes
    for p in model.get_parameters():
        name = p.get_friendly_name()
        if name.startswith("key_cache."):
            assert p.get_partial_shape() == ov.PartialShape([-1, 1, 40, 32])
        if name in states:
            assert p.get_element_type() == ov.Type.f32


def test_less_model_compiles_and_runs_the_op_natively(tiny_model: Path) -> None:
    """The op needs no extension library: the plugin compiles it from _core's class."""
    params = [ops.parameter([-1, HEADS * HEAD_DIM], ov.Type.f32),
              ops.parameter([-1, HEADS * HEAD_DIM], ov.Type.f32),
              *(ops.parameter([-1], ov.Type.i32) for _ in range(14))]
    model = less_mix_model(params, F32_KEYS, KV_HEADS, HEADS // KV_HEADS, False)
    assert model.get_results()[0].input_value(0).get_node().get_type_name() == "LESSMix"
    compiled = ov.Core().compile_model(model, "CPU")
    assert compiled.outputs[0].get_element_type() == ov.Type.f32
    with pytest.raises(ValueError, match="16 Parameters"):
        less_mix_model(params[:15], F32_KEYS, KV_HEADS, 4, False)


def test_fastkv_residual_stream(tiny_model: Path) -> None:
    model = read_paged_model(tiny_model)
    stream = residual_stream(model)
    assert num_layers(model) == LAYERS and len(stream) == 2 * LAYERS + 1
    assert all(h.get_node().get_type_name() == "Add" for h in stream[1:])
    for prev, h in zip(stream, stream[1:], strict=False):
        assert prev in [v for v in h.get_node().input_values()]
        assert h.get_partial_shape() == stream[0].get_partial_shape()


# ---------------------------------------------------------------- errors


def test_fastkv_errors_name_the_node_and_change_nothing(tiny_model: Path) -> None:
    model = read_paged_model(tiny_model)
    stream = residual_stream(model)
    # a second residual Add reading h_3 (the output of layer 1's attention branch), kept in the
    # graph (and in its clones) by an extra output
    node = stream[3].get_node()
    model.add_results([ops.result(ops.add(stream[3], ops.constant(np.float32(1))))])
    inputs, counts = _inputs(model), _ops(model)
    with pytest.raises(FastKVPatternError,
                       match=f"^split_at_layer: 2 residual Adds read {node.get_friendly_name()}$"):
        split_at_layer(model, 1)
    with pytest.raises(FastKVPatternError, match="^split_at_layer: 2 residual Adds"):
        residual_stream(model)
    assert _inputs(model) == inputs and _ops(model) == counts
    with pytest.raises(ValueError, match=r"^split_layer=3: must be in \[0, 2\] for a model of 4 "
                                         r"layers$") as err:
        split_at_layer(read_paged_model(tiny_model), LAYERS - 1)
    assert type(err.value) is ValueError


def test_less_errors_name_the_node_and_change_nothing(tiny_model: Path) -> None:
    paged = read_paged_model(tiny_model)
    with pytest.raises(LESSPatternError, match="^add_less: run to_per_head first$"):
        add_less(paged, _less_weights(), F32_KEYS)
    model = to_per_head(paged)
    inputs, counts = _inputs(model), _ops(model)
    # weights for a head size of 16: every active layer's query is 8*32 wide
    first = _pas(model)[1].get_friendly_name()  # layer 0 is switched off: never checked
    with pytest.raises(LESSPatternError,
                       match=f"^add_less: {first}: query width 256, the weights need 8\\*16$"):
        add_less(model, _less_weights(head_dim=16), F32_KEYS)
    assert _inputs(model) == inputs and _ops(model) == counts
    assert not model.has_rt_info(["kvcrush_less", "feature_dim"])
    other = LESSWeights.initial(LAYERS - 1, HEADS, KV_HEADS, HEAD_DIM, hidden=6, feature_dim=4)
    with pytest.raises(LESSPatternError, match="^add_less: the model has 4 attention layers, "
                                               "the weights 3$"):
        add_less(model, other, F32_KEYS)
    add_less(model, _less_weights(), F32_KEYS)
    err = pytest.raises(LESSPatternError, add_less, model, _less_weights(), F32_KEYS)
    assert str(err.value) == "add_less: the model already has LESS"
    assert type(err.value) is LESSPatternError and isinstance(err.value, RuntimeError)


def test_less_rejects_a_layer_without_merge(tiny_model: Path) -> None:
    model = to_per_head(read_paged_model(tiny_model))
    pa = _pas(model)[2]
    merge = next(n for n in model.get_ordered_ops()
                 if n.get_friendly_name() == f"{pa.get_friendly_name()}/per_head_out/merge")
    merge.set_friendly_name("renamed")
    with pytest.raises(LESSPatternError, match=f"^add_less: {pa.get_friendly_name()} has no "
                                               r"per-head output merge \(run to_per_head first\)"):
        add_less(model, _less_weights(), F32_KEYS)
    assert not any(n.get_type_name() == "LESSMix" for n in model.get_ordered_ops())


def test_fastkv_rejects_a_scores_output_without_layer(tiny_model: Path) -> None:
    model = read_paged_model(tiny_model)
    result = next(r for r in model.get_results() if "scores.1" in r.output(0).get_names())
    result.output(0).set_names({"scores.x"})
    with pytest.raises(FastKVPatternError, match=f"^split_at_layer: output 'scores.x' of "
                                                 f"{result.get_friendly_name()}: no layer index"):
        split_at_layer(model, 0)




def test_rejects_alibi_naming_the_node_and_changes_nothing(tiny_model: Path) -> None:
    model = read_paged_model(tiny_model)
    last = _pas(model)[-1]
    last.input(11).replace_source_output(ops.constant(np.ones(4, np.float32)).output(0))
    inputs, counts = _inputs(model), _ops(model)
    with pytest.raises(PerHeadPatternError,
                       match=f"^to_per_head: {last.get_friendly_name()} uses ALiBi slopes"):
        to_per_head(model)
    # every op is checked before the first is rewritten: the earlier layers are untouched too
    assert _inputs(model) == inputs and _ops(model) == counts
    assert all(_rt(pa, "num_k_heads") == KV_HEADS for pa in _pas(model))
    assert not model.has_rt_info(["kvcrush_per_head", "num_kv_heads"])


def test_rejects_pa_not_reading_a_key_cache(tiny_model: Path) -> None:
    model = read_paged_model(tiny_model)
    pa = _pas(model)[1]
    cache = pa.input_value(3)
    other = ops.parameter(cache.get_partial_shape(), cache.get_element_type(), name="other")
    other.output(0).set_names({"other"})
    pa.input(3).replace_source_output(other.output(0))
    with pytest.raises(PerHeadPatternError,
                       match=f"input 3 of {pa.get_friendly_name()} is not a 'key_cache.L' "
                             r"Parameter \(names \['other'\]\)"):
        to_per_head(model)


def test_error_types_are_the_modules_own(tiny_model: Path) -> None:
    err = pytest.raises(PerHeadPatternError, to_per_head,
                        ov.Core().read_model(tiny_model / "openvino_model.xml"))
    assert type(err.value) is PerHeadPatternError  # not _core's exception type
    assert isinstance(err.value, RuntimeError)
    model = read_paged_model(tiny_model)
    model.get_parameters()[0].set_friendly_name("renamed")  # input_ids: no embedding to find
    fast = pytest.raises(FastKVPatternError, split_at_layer, model, 0)
    assert type(fast.value) is FastKVPatternError and isinstance(fast.value, ValueError)
    assert str(fast.value) == "split_at_layer: the model has no input_ids parameter"


# ---------------------------------------------------------------- the handoff to C++


def test_handoff_checks_type_and_runtime() -> None:
    with pytest.raises(TypeError, match="expected an openvino.Model"):
        model_address(object())  # type: ignore[arg-type]
    assert _core.openvino_build() == ov.get_version()
    assert ov.get_version().startswith(_core.openvino_compiled_version())


def test_model_outlives_and_is_shared_with_cpp(tiny_model: Path) -> None:
    """The pass shares ownership (shared_from_this) for the call only: the Python object keeps
    the graph, sees the change, and can still be cloned, rewritten and compiled afterwards."""
    model = read_paged_model(tiny_model)
    address = model._get_raw_address()
    to_per_head(model)
    assert model._get_raw_address() == address
    clone = model.clone()
    assert _inputs(clone) == _inputs(model)
    ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def test_core_loads_without_openvino_imported_first() -> None:
    """``_core`` finds the wheel's libopenvino through its RUNPATH (``$ORIGIN/../openvino/libs``)
    when nothing loaded it before: the extension file is loaded on its own in a fresh process."""
    code = (
        "import importlib.util as u, sys\n"
        f"spec = u.spec_from_file_location('kvcrush_ov._core', {_core.__file__!r})\n"
        "m = u.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert 'openvino' not in sys.modules\n"
        "print(m.openvino_build())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == ov.get_version()
