"""KVzip's per-query maximum (engine/query_scores.py, transformations/query_key.py): the scoring
graph against a numpy reference, and the query / key outputs of a per-head model."""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest

from kvcrush_ov.engine.query_scores import ReplayScorer
from kvcrush_ov.transformations.paged import read_paged_model
from kvcrush_ov.transformations.per_head import to_per_head
from kvcrush_ov.transformations.query_key import (
    add_query_key,
    attention_scale,
    key_name,
    query_name,
)


def _reference(query, keys, past, scale, group=1, lead=0):
    """query [H, w, G*D], keys [H][n_h, D] (past rows then the step's), past [H] ->
    [H][n_h]: max over groups of queries (query t in group (lead + t) // group) of the
    softmax summed over the group's queries and the G query heads."""
    h, w, gd = query.shape
    d = keys[0].shape[1]
    out = []
    for head in range(h):
        k = keys[head]
        t_all = len(k) - past[head]
        q = query[head].reshape(w, gd // d, d)
        sums: dict[int, np.ndarray] = {}
        for t in range(w):
            visible = past[head] + (t_all - w) + t + 1
            logits = scale * q[t] @ k[:visible].T  # [G, visible]
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            acc = sums.setdefault((lead + t) // group, np.zeros(len(k)))
            acc[:visible] += p.sum(0)
        out.append(np.max(list(sums.values()), axis=0))
    return out


def test_the_scorer_is_each_querys_largest_attention_and_keeps_the_keys():
    """Two steps of one sequence whose heads hold different numbers of rows (after an
    eviction): every row's score is the largest any of the step's last w queries gave it
    (softmax over the rows each query sees, summed over its query heads); the cached keys are
    read once, the first step's keys kept for the second."""
    rng = np.random.default_rng(0)
    heads, group, dim, scale = 2, 3, 8, 0.35
    cached = [rng.normal(size=(n, dim)).astype(np.float32) for n in (11, 7)]
    reads = []
    keys = [c.copy() for c in cached]  # what the cache holds

    def read_keys(table, layer, head, n):
        reads.append((table, layer, head, n))
        return keys[head][:n]

    scorer = ReplayScorer(ov.Core(), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}, 2, heads,
                            group, dim, scale, read_keys)
    past = np.array([11, 7])
    for t, w in ((5, 5), (4, 2)):
        new = rng.normal(size=(heads, t, dim)).astype(np.float32)
        query = rng.normal(size=(heads, w, group * dim)).astype(np.float32)
        keys = [np.concatenate([keys[h], new[h]]) for h in range(heads)]
        for layer in range(2):
            got = scorer.score(9, "table", layer, past, query, new)
            want = _reference(query, keys, past, scale)
            for h in range(heads):
                assert got[h].shape == (past[h] + t,)
                np.testing.assert_allclose(got[h], want[h], rtol=1e-5, atol=1e-6)
        past = past + t
    assert reads == [("table", layer, h, n) for layer in range(2) for h, n in enumerate((11, 7))]
    # groups of 3 queries, the first one third in its group: sums over (lead + t) // 3
    new = rng.normal(size=(heads, 5, dim)).astype(np.float32)
    query = rng.normal(size=(heads, 5, group * dim)).astype(np.float32)
    keys = [np.concatenate([keys[h], new[h]]) for h in range(heads)]
    got = scorer.score(9, "table", 0, past, query, new, 3, 2)
    want = _reference(query, keys, past, scale, 3, 2)
    for h in range(heads):
        np.testing.assert_allclose(got[h], want[h], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lead=3, allowed 0..2"):
        scorer.score(9, "table", 0, past + 5, query, new, 3, 3)
    past = past + 5
    assert scorer.decoded_rows == 2 * (11 + 7)
    scorer.retain(set())
    new = rng.normal(size=(heads, 1, dim)).astype(np.float32)
    keys = [np.concatenate([keys[h], new[h]]) for h in range(heads)]
    got = scorer.score(9, "table", 0, past, query[:, -1:], new)  # forgotten: read again
    assert reads[4:] == [("table", 0, 0, 25), ("table", 0, 1, 21)]
    want = _reference(query[:, -1:], keys, past, scale)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_query_and_key_outputs_of_the_per_head_graph(tiny_model):
    """attn_query.L / attn_key.L are PagedAttention's own inputs, one pair per layer, with the
    softmax scale recorded; a decode (sequence-major) graph or a plain one is refused."""
    paged = read_paged_model(tiny_model / "openvino_model.xml", score_outputs=True,
                             logits_indices=True, score_aggregation=True)
    decode = to_per_head(paged.clone(), sequence_major=True)
    model = add_query_key(to_per_head(paged))
    names = {n for o in model.outputs for n in o.get_names()}
    layers = sum(1 for i in model.inputs if i.get_any_name().startswith("key_cache."))
    assert {query_name(i) for i in range(layers)} | {key_name(i) for i in range(layers)} <= names
    head = model.output(key_name(0)).get_partial_shape()[-1].get_length()
    assert attention_scale(model) == pytest.approx(1 / np.sqrt(head))
    with pytest.raises(ValueError, match="sequence-major"):
        add_query_key(decode)
    with pytest.raises(Exception, match="to_per_head"):
        add_query_key(read_paged_model(tiny_model / "openvino_model.xml", score_outputs=True))


def test_the_kernel_names_bad_arguments():
    """_core.grouped_max_scores refuses a bad group, lead or first before any work."""
    from kvcrush_ov import _core

    logits = np.zeros((2, 4, 3, 5), np.float32)
    first = np.zeros(2, np.int32)
    with pytest.raises(ValueError, match="group: allowed an integer >= 1"):
        _core.grouped_max_scores(logits, first, 0, 0)
    with pytest.raises(ValueError, match="lead: allowed 0..3"):
        _core.grouped_max_scores(logits, first, 4, 4)
    with pytest.raises(ValueError, match="first: allowed \\[H\\]"):
        _core.grouped_max_scores(logits, np.zeros(3, np.int32), 1, 0)
    out = _core.grouped_max_scores(logits, first, 2, 1)
    # query t sees rows 0..t, each 1 / (t + 1) per query head (3 of them); groups summed
    groups = [[0], [1, 2], [3]]  # lead 1: query 0 alone, then 1-2, then 3
    want = np.max([[3 * sum(1 / (t + 1) for t in g if j <= t) for j in range(5)]
                   for g in groups], axis=0)
    np.testing.assert_allclose(out[0], want, rtol=1e-5)
    np.testing.assert_allclose(out[1], want, rtol=1e-5)
