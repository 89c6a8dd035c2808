"""Paged-attention conversion and the ``logits_indices`` pass, run on CPU with an f32 KV cache.

A prefill of ``T`` tokens as one sequence: input_ids / position_ids [T], past_lens [1],
subsequence_begins [2], block_indices_begins [2], block_indices [blocks], max_context_len [],
key_cache.L / value_cache.L [blocks, kv_heads, block_size, head_dim] (read from the compiled
model), logits_indices [N]; logits [T, 1, V] without the pass, [N, 1, V] with it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from kvcrush_ov.transformations.logits import (
    LOGITS_INDICES_NAME,
    LogitsPatternError,
    add_logits_indices,
    find_lm_head,
)
from kvcrush_ov.transformations.paged import read_paged_model, to_paged

F32 = {"KV_CACHE_PRECISION": "f32", "INFERENCE_PRECISION_HINT": "f32"}
NUM_BLOCKS = 8
PROMPT_LEN = 20


def _xml(folder: Path) -> str:
    return str(folder / "openvino_model.xml")


def _input_names(model: ov.Model | ov.CompiledModel) -> set[str]:
    return {n for i in model.inputs for n in i.get_names()}


def _output_names(model: ov.Model | ov.CompiledModel) -> set[str]:
    return {n for o in model.outputs for n in o.get_names()}


def _num_layers(model: ov.Model | ov.CompiledModel) -> int:
    return sum(1 for n in _input_names(model) if n.startswith("key_cache."))


class Prefill:
    """One compiled paged model with its own zero-filled KV cache tensors (kept alive here)."""

    def __init__(self, core: ov.Core, model: ov.Model, num_blocks: int) -> None:
        self.compiled = core.compile_model(model, "CPU", F32)
        self.request = self.compiled.create_infer_request()
        self.num_blocks = num_blocks
        self.caches: dict[str, ov.Tensor] = {}
        for layer in range(_num_layers(self.compiled)):
            for kind in ("key_cache", "value_cache"):
                name = f"{kind}.{layer}"
                port = self.compiled.input(name)
                shape = port.get_partial_shape()
                assert shape[0].is_dynamic and all(d.is_static for d in list(shape)[1:]), shape
                dims = [num_blocks] + [d.get_length() for d in list(shape)[1:]]
                tensor = ov.Tensor(port.get_element_type(), ov.Shape(dims))
                tensor.data[...] = 0
                self.caches[name] = tensor
        self.block_size = self.caches["key_cache.0"].get_shape()[2]

    def run(self, ids: np.ndarray, logits_indices: list[int] | None = None) -> np.ndarray:
        t = len(ids)
        blocks = -(-t // self.block_size)
        assert blocks <= self.num_blocks
        inputs: dict[str, object] = {
            "input_ids": np.asarray(ids, dtype=np.int64),
            "position_ids": np.arange(t, dtype=np.int64),
            "past_lens": np.array([0], dtype=np.int32),
            "subsequence_begins": np.array([0, t], dtype=np.int32),
            "block_indices_begins": np.array([0, blocks], dtype=np.int32),
            "block_indices": np.arange(blocks, dtype=np.int32),
            "max_context_len": np.array(t, dtype=np.int32),
            **self.caches,
        }
        if logits_indices is not None:
            inputs[LOGITS_INDICES_NAME] = np.asarray(logits_indices, dtype=np.int64)
        self.request.infer(inputs)
        return np.array(self.request.get_tensor("logits").data, copy=True)


def _prompt(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=n, dtype=np.int64)


# ---------------------------------------------------------------- conversion: names and shapes


@pytest.mark.parametrize("score_outputs", [True, False])
def test_to_paged_inputs_and_outputs(tiny_model: Path, score_outputs: bool) -> None:
    model = ov.Core().read_model(_xml(tiny_model))
    assert to_paged(model, score_outputs=score_outputs) is model
    names = _input_names(model)
    for name in ("input_ids", "position_ids", "past_lens", "subsequence_begins", "block_indices",
                 "block_indices_begins", "max_context_len", "key_cache.0", "value_cache.0"):
        assert name in names, (name, sorted(names))
    outputs = _output_names(model)
    assert "logits" in outputs
    scores = {n for n in outputs if n.startswith("scores.")}
    if score_outputs:
        assert "scores.0" in scores
        assert len(scores) == _num_layers(model)
    else:
        assert not scores, scores
    assert LOGITS_INDICES_NAME not in names


def test_read_paged_model_adds_logits_indices(tiny_model: Path) -> None:
    plain = read_paged_model(tiny_model, logits_indices=False)
    assert LOGITS_INDICES_NAME not in _input_names(plain)
    model = read_paged_model(_xml(tiny_model), score_outputs=False)
    param = model.input(LOGITS_INDICES_NAME)
    assert param.get_element_type() == ov.Type.i64
    assert param.get_partial_shape().rank.get_length() == 1
    assert param.get_partial_shape()[0].is_dynamic
    logits = model.output("logits").get_partial_shape()
    vocab = plain.output("logits").get_partial_shape()[2]
    assert logits.rank.get_length() == 3 and logits[0].is_dynamic
    assert logits[1].get_length() == 1 and logits[2] == vocab
    gathers = [n for n in model.get_ordered_ops() if n.get_type_name() == "Gather"
               and LOGITS_INDICES_NAME in n.input_value(1).get_names()]
    assert len(gathers) == 1
    (consumer,) = gathers[0].output(0).get_target_inputs()
    assert consumer.get_node().get_type_name() == "MatMul"
    assert consumer.get_node().get_friendly_name() == find_lm_head(model).get_friendly_name()
    assert int(gathers[0].input_value(2).get_node().get_data()) == 0


# ---------------------------------------------------------------- numerics


@pytest.fixture(scope="module")
def tiny_prefills(tiny_model: Path) -> tuple[Prefill, Prefill]:
    core = ov.Core()
    full = Prefill(core, read_paged_model(tiny_model, logits_indices=False), NUM_BLOCKS)
    picked = Prefill(core, read_paged_model(tiny_model, logits_indices=True), NUM_BLOCKS)
    return full, picked


def test_logits_indices_last_token_matches_full(tiny_prefills: tuple[Prefill, Prefill]) -> None:
    full, picked = tiny_prefills
    vocab = full.compiled.output("logits").get_partial_shape()[2].get_length()
    ids = _prompt(vocab, PROMPT_LEN)
    ref = full.run(ids)
    assert ref.shape == (PROMPT_LEN, 1, vocab)
    got = picked.run(ids, [PROMPT_LEN - 1])
    assert got.shape == (1, 1, vocab)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[0], ref[-1], rtol=1e-5, atol=1e-5)


def test_logits_indices_two_rows_match_full(tiny_prefills: tuple[Prefill, Prefill]) -> None:
    full, picked = tiny_prefills
    vocab = full.compiled.output("logits").get_partial_shape()[2].get_length()
    ids = _prompt(vocab, PROMPT_LEN, seed=1)
    ref = full.run(ids)
    got = picked.run(ids, [3, PROMPT_LEN - 1])
    assert got.shape == (2, 1, vocab)
    # The rows differ from each other, so a wrong gather axis or index would be caught.
    assert not np.allclose(ref[3], ref[PROMPT_LEN - 1], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got[0], ref[3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], ref[PROMPT_LEN - 1], rtol=1e-5, atol=1e-5)
    # Order follows logits_indices.
    swapped = picked.run(ids, [PROMPT_LEN - 1, 3])
    np.testing.assert_allclose(swapped[::-1], got, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- errors


def test_pass_rejects_model_without_logits_output() -> None:
    x = ops.parameter([-1, 1, 8], ov.Type.f32, name="x")
    w = ops.constant(np.ones((16, 8), dtype=np.float32))
    out = ops.matmul(x, w, False, True)
    out.output(0).set_names({"hidden"})
    model = ov.Model([ops.result(out)], [x], "no_logits")
    with pytest.raises(LogitsPatternError, match="no output named 'logits'"):
        add_logits_indices(model)


def test_pass_rejects_logits_without_matmul() -> None:
    x = ops.parameter([-1, 1, 8], ov.Type.f32, name="x")
    out = ops.reduce_sum(x, ops.constant([2], ov.Type.i64), keep_dims=True)
    out.output(0).set_names({"logits"})
    model = ov.Model([ops.result(out)], [x], "no_matmul")
    with pytest.raises(LogitsPatternError, match="could not find the lm_head MatMul"):
        add_logits_indices(model)


def test_pass_rejects_non_paged_model(tiny_model: Path) -> None:
    model = ov.Core().read_model(_xml(tiny_model))
    assert find_lm_head(model).get_type_name() == "MatMul"
    with pytest.raises(LogitsPatternError, match="paged-attention layout"):
        add_logits_indices(model)
    assert LOGITS_INDICES_NAME not in _input_names(model)


def test_pass_rejects_second_application(tiny_model: Path) -> None:
    model = read_paged_model(tiny_model)
    with pytest.raises(LogitsPatternError, match="already has an input"):
        add_logits_indices(model)


# ---------------------------------------------------------------- SmolLM2: check and timing


@pytest.mark.real_model
def test_smollm2_prefill_1024_with_and_without_pass(smollm2_fp16: Path) -> None:
    n, repeats = 1024, 1  # the check needs one cold run (CI time); speed: docs/performance.md
    core = ov.Core()
    full = Prefill(core, read_paged_model(smollm2_fp16, logits_indices=False), 40)
    picked = Prefill(core, read_paged_model(smollm2_fp16, logits_indices=True), 40)
    vocab = full.compiled.output("logits").get_partial_shape()[2].get_length()
    ids = _prompt(vocab, n)

    times: dict[str, list[float]] = {"full": [], "logits_indices": []}
    ref = got = None
    for _ in range(repeats):  # interleaved, so both variants see the same machine state
        start = time.perf_counter()
        ref = full.run(ids)
        times["full"].append(time.perf_counter() - start)
        start = time.perf_counter()
        got = picked.run(ids, [n - 1])
        times["logits_indices"].append(time.perf_counter() - start)

    assert ref is not None and got is not None
    assert ref.shape == (n, 1, vocab) and got.shape == (1, 1, vocab)
    np.testing.assert_allclose(got[0], ref[-1], rtol=1e-4, atol=1e-4)
    full_ms, picked_ms = (min(times[k]) * 1e3 for k in ("full", "logits_indices"))
    print(f"\nSmolLM2-135M fp16 weights, f32 inference/KV, {n}-token prefill (min of {repeats}): "
          f"all logits {full_ms:.1f} ms, logits_indices=[{n - 1}] {picked_ms:.1f} ms (cold), "
          f"ratio {full_ms / picked_ms:.2f}x")
