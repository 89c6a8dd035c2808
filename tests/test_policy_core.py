"""The C++ eviction entry points (kvcrush/policy.hpp: ``kvcrush::select_keep``,
``kvcrush::plan_event``) called directly through the bindings, as a C++ pipeline calls them,
against the Python policies' path (the planner's ``for_budget`` then ``select``, called back from
``kvcrush::plan_event``); the checks of a Python policy's keep mask; configuration errors naming
the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from kvcrush_ov import _core
from kvcrush_ov.config import CacheEvictionConfig, KVCrushConfig
from kvcrush_ov.errors import ConfigError
from kvcrush_ov.eviction.base import EvictionInputs, check_keep
from kvcrush_ov.eviction.factory import make_policy
from kvcrush_ov.eviction.kvcrush import KVCrush
from kvcrush_ov.eviction.planner import plan_eviction
from kvcrush_ov.eviction.scores import SequenceScores


def event_inputs(seed: int, ragged: bool, num_layers: int = 5, num_heads: int = 3,
                 n: int = 700) -> EvictionInputs:
    """Candidates of one event: ``n`` positions per head (ragged: each head lost ~20% of them
    in an earlier per-head eviction), heavy-tailed scores, counts of a decode-time event."""
    rng = np.random.default_rng(seed)
    scores, positions, counts = [], [], []
    for _ in range(num_layers):
        rows = [np.flatnonzero(rng.random(n) > 0.2) + 32 if ragged else np.arange(32, 32 + n)
                for _ in range(num_heads)]
        positions.append(rows)
        scores.append([(rng.pareto(1.5, size=len(p)) * 0.01).astype(np.float32) for p in rows])
        counts.append([np.maximum(64 - (p - p[0]) // 16, 1).astype(np.float32) for p in rows])
    return EvictionInputs.from_lists(scores, positions, counts, block_size=32)


# (total budget per head, candidates kept per head, tokens written): full KVCrush share,
# tapered, and tapered to nothing
EVENTS = [(400, 240, 800), (300, 140, 1200), (200, 40, 2400)]


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize(("total", "num_keep", "written"), EVENTS)
def test_default_config_direct_matches_the_python_policy(ragged: bool, total: int,
                                                          num_keep: int, written: int) -> None:
    inputs = event_inputs(3, ragged)
    python = make_policy(CacheEvictionConfig()).for_budget(total, num_keep, written)
    want = python.select(inputs, num_keep, np.random.default_rng(0))
    direct = _core.PolicyConfig.default().for_budget(total, num_keep, written)
    got = _core.select_keep(direct, *inputs.core_args(), num_keep)
    check_keep(got, inputs, num_keep, "select_keep")
    assert np.array_equal(got, want)
    assert direct.share == pytest.approx(python.share)
    # the KVCrush part is live where the taper leaves a share, and moves the answer
    plain = _core.select_keep(_core.PolicyConfig(importance="snapkv"), *inputs.core_args(),
                              num_keep)
    if python.share >= 0.05:
        assert not np.array_equal(got, plain)
    elif python.share == 0:
        assert np.array_equal(got, plain)


def test_cpp_defaults_are_the_default_eviction() -> None:
    """PolicyConfig{} spelled out field by field as CacheEvictionConfig() resolves them on the
    native backend: the same keep masks."""
    cfg = CacheEvictionConfig()
    crush = cfg.kvcrush or KVCrushConfig()
    explicit = _core.PolicyConfig(importance=cfg.importance,
                                  aggregation_mode=cfg.aggregation_mode, pooling="avg",
                                  kernel_size=31, offset=cfg.pooling_offset, kvcrush=True,
                                  share=crush.budget, anchors=[crush.anchor_point_mode],
                                  granularity="token", taper=(0.125, 0.5))
    inputs = event_inputs(5, True)
    for total, num_keep, written in EVENTS:
        a = _core.select_keep(_core.PolicyConfig.default().for_budget(total, num_keep, written),
                              *inputs.core_args(), num_keep)
        b = _core.select_keep(explicit.for_budget(total, num_keep, written),
                              *inputs.core_args(), num_keep)
        assert np.array_equal(a, b)


def test_planner_event_matches_a_direct_call() -> None:
    """plan_eviction (sinks, recent window, candidates, for_budget, select) and one direct C++
    call on the candidates it built keep the same rows."""
    rng = np.random.default_rng(11)
    num_layers, num_heads, rows = 3, 2, 900
    positions = [[np.arange(rows, dtype=np.int64) for _ in range(num_heads)]
                 for _ in range(num_layers)]
    scores = SequenceScores(num_layers, num_heads)
    for layer in range(num_layers):
        for h in range(num_heads):
            scores.add(layer, h, rng.exponential(size=rows).astype(np.float32))
    scores.add_queries(rows - 32, 32)
    policy = make_policy(CacheEvictionConfig())
    budget, written = 300, rows
    decision = plan_eviction(positions, scores, policy, budget, 32, 128, written, 32,
                             np.random.default_rng(0))
    lo, hi = decision.num_sinks, rows - decision.num_recent
    inputs = EvictionInputs(
        np.stack([scores.acc[layer][h][lo:hi] for layer in range(num_layers)
                  for h in range(num_heads)]).reshape(num_layers, num_heads, -1),
        scores.counts(np.arange(lo, hi)).astype(np.float32)[None, None, :].repeat(
            num_layers, 0).repeat(num_heads, 1),
        np.broadcast_to(np.arange(lo, hi), (num_layers, num_heads, hi - lo)).copy(),
        np.full((num_layers, num_heads), hi - lo, np.int64), 32)
    direct = _core.select_keep(_core.PolicyConfig.default().for_budget(
        budget, decision.num_keep, written), *inputs.core_args(), decision.num_keep)
    for layer in range(num_layers):
        for h in range(num_heads):
            want = np.concatenate([np.arange(lo), lo + np.flatnonzero(direct[layer, h]),
                                   np.arange(hi, rows)])
            assert np.array_equal(decision.keep_rows[layer][h], want)


def test_random_anchor_bits_come_from_the_caller() -> None:
    inputs = event_inputs(7, True)
    policy = KVCrush(make_policy(CacheEvictionConfig()).importance, anchor=("random", "zeros",
                                                                             "random"))
    want = policy.select(inputs, 200, np.random.default_rng(4))
    bits = policy.random_bits(inputs, np.random.default_rng(4))
    assert bits is not None and bits.shape == (2, 5, 3)
    assert np.array_equal(_core.select_keep(policy.core, *inputs.core_args(), 200, bits), want)
    other = _core.select_keep(policy.core, *inputs.core_args(), 200, ~bits)
    assert not np.array_equal(other, want)  # the bits decide the anchors
    with pytest.raises(ValueError, match="random_bits"):
        _core.select_keep(policy.core, *inputs.core_args(), 200)


# kwargs of _core.PolicyConfig, the field the error must name, and the CacheEvictionConfig
# (or KVCrushConfig) whose ConfigError says the same, where there is one
BAD = [
    ({"importance": "median"}, "eviction.importance", None),
    ({"importance": "snapkv", "aggregation_mode": "max"}, "eviction.aggregation_mode",
     lambda: CacheEvictionConfig(aggregation_mode="max")),
    ({"importance": "snapkv", "pooling": "median"}, "eviction.pooling",
     lambda: CacheEvictionConfig(pooling="median")),
    ({"importance": "snapkv", "kernel_size": 4}, "eviction.kernel_size",
     lambda: CacheEvictionConfig(kernel_size=4)),
    ({"importance": "snapkv", "kernel_size": -3}, "eviction.kernel_size", None),
    ({"importance": "snapkv", "offset": 16}, "eviction.pooling_offset",
     lambda: CacheEvictionConfig(pooling_offset=16)),
    ({"importance": "pyramidkv", "beta": 0.5}, "pyramidkv.beta", None),
    ({"importance": "adakv", "alpha": 1.5}, "adakv.alpha", None),
    ({"importance": "adakv", "scope": "global"}, "adakv.scope", None),
    ({"importance": "snapkv", "kvcrush": True, "share": 1.5}, "kvcrush.budget",
     lambda: KVCrushConfig(budget=1.5)),
    ({"importance": "snapkv", "kvcrush": True, "anchors": ["middle"]},
     "kvcrush.anchor_point_mode", lambda: KVCrushConfig(anchor_point_mode="middle")),
    ({"importance": "snapkv", "kvcrush": True, "anchors": []}, "kvcrush.anchor_point_mode",
     lambda: KVCrushConfig(anchor_point_mode=())),
    ({"importance": "snapkv", "kvcrush": True, "granularity": "page"}, "kvcrush.granularity",
     lambda: KVCrushConfig(granularity="page")),
    ({"importance": "snapkv", "kvcrush": True, "taper": (0.5, 0.5)}, "kvcrush.taper", None),
    ({"importance": "streaming", "kvcrush": True, "bit_aggregation": "sum"},
     "kvcrush.aggregation_mode", None),
]


@pytest.mark.parametrize(("kwargs", "field", "python"), BAD, ids=[f for _, f, _ in BAD])
def test_bad_config_names_the_field(kwargs: dict, field: str, python) -> None:
    with pytest.raises(ValueError, match=f"^{field.replace('.', r'[.]')}=") as err:
        _core.PolicyConfig(**kwargs)
    if python is not None:  # the same words as the Python configuration's error
        with pytest.raises(ConfigError) as want:
            python()
        assert str(err.value) == str(want.value)


def test_bad_arguments_name_the_argument() -> None:
    inputs = event_inputs(1, False, n=64)
    cfg = _core.PolicyConfig.default()
    with pytest.raises(ValueError, match="num_keep=-1"):
        _core.select_keep(cfg, *inputs.core_args(), -1)
    with pytest.raises(ValueError, match="fit_budget: the budget"):
        _core.select_keep(cfg, *inputs.core_args(), 65)
    scores, counts, positions, lengths, block_size = inputs.core_args()
    with pytest.raises(ValueError, match="lengths"):
        _core.select_keep(cfg, scores, counts, positions, lengths[:, :1].copy(), block_size, 8)
    with pytest.raises(ValueError, match="block_size=0"):
        _core.select_keep(cfg, scores, counts, positions, lengths, 0, 8)


# --- one event from the cached rows: kvcrush::plan_event with the core's selection against
# --- the same planner calling a Python policy's select back (plan_eviction, plan_event) ---

def plan_in_cpp(positions: list[list[np.ndarray]], scores: SequenceScores | None, policy,
                budget: int, start_size: int, recent_size: int, num_written: int,
                block_size: int, rng: np.random.Generator) -> tuple[list[list[np.ndarray]], tuple]:
    """plan_eviction's arguments through ``_core.plan_event`` (the rows of every (layer, head)
    flattened as a C++ pipeline holds them): kept rows [l][h] and (sinks, recent, num_keep)."""
    num_layers, num_heads = len(positions), len(positions[0])
    flat = [p for row in positions for p in row]
    offsets = np.zeros(len(flat) + 1, np.int64)
    np.cumsum([len(p) for p in flat], out=offsets[1:])
    acc, queries = None, np.zeros(0, np.int64)
    if scores is not None:
        acc = np.concatenate([scores.aligned(layer, h, len(p))[:len(p)]
                              for layer, row in enumerate(positions) for h, p in enumerate(row)])
        queries = scores.queries()
    bits = (policy.random_bits_for(num_layers, num_heads, block_size, rng)
            if isinstance(policy, KVCrush) else None)
    kept, kept_offsets, *counts = _core.plan_event(
        policy.core, np.concatenate(flat), acc, offsets, queries, num_layers, num_heads, budget,
        start_size, recent_size, num_written, block_size, bits)
    rows = np.split(kept, kept_offsets[1:-1])
    return [rows[layer * num_heads:(layer + 1) * num_heads] for layer in range(num_layers)], \
        tuple(counts)


def cached_rows(seed: int, kind: str, num_layers: int = 4, num_heads: int = 3,
                written: int = 600) -> tuple[list[list[np.ndarray]], SequenceScores]:
    """Rows of one sequence: ``sorted`` (positions 0..written-1), ``holes`` (rows moved by an
    earlier compaction: not in position order), ``ragged`` (each head lost its own positions,
    never a sink or a recent one). Scores cover all but the last few rows (never scored)."""
    rng = np.random.default_rng(seed)
    positions = []
    for _ in range(num_layers):
        row = []
        for _ in range(num_heads):
            p = np.arange(written, dtype=np.int64)
            if kind in ("holes", "ragged"):
                middle = p[32:written - 128]
                lost = rng.random(len(middle)) < (0.3 if kind == "ragged" else 0.0)
                p = np.concatenate([p[:32], middle[~lost], p[written - 128:]])
            if kind == "holes":
                p = p[rng.permutation(len(p))]
            row.append(p)
        positions.append(row)
    scores = SequenceScores(num_layers, num_heads)
    for layer in range(num_layers):
        for h in range(num_heads):
            scores.add(layer, h, rng.exponential(size=len(positions[layer][h]) - 5)
                       .astype(np.float32))
    scores.add_queries(written - 40, 40)
    return positions, scores


PLANNED = [
    ("default", lambda: make_policy(CacheEvictionConfig())),
    ("h2o-norm_sum", lambda: make_policy(CacheEvictionConfig(importance="h2o", kvcrush=None))),
    ("streaming", lambda: make_policy(CacheEvictionConfig(importance="streaming",
                                                          kvcrush=None))),
    ("pyramidkv-crush-block-random", lambda: make_policy(CacheEvictionConfig(
        importance="pyramidkv", kvcrush=KVCrushConfig(granularity="block",
                                                     anchor_point_mode=("random", "mean"))))),
    ("adakv-dynamic", lambda: make_policy(CacheEvictionConfig(
        importance="adakv", kvcrush=KVCrushConfig(dynamic_split=True, budget=0.5)))),
]


@pytest.mark.parametrize("kind", ["sorted", "holes", "ragged"])
@pytest.mark.parametrize(("name", "factory"), PLANNED, ids=[n for n, _ in PLANNED])
def test_plan_event_matches_the_python_planner(name: str, factory, kind: str) -> None:
    positions, scores = cached_rows(2, kind)
    policy = factory()
    acc = None if name == "streaming" else scores
    for budget in (170, 260, 400):
        got, counts = plan_in_cpp(positions, acc, policy, budget, 32, 128, 600, 16,
                                  np.random.default_rng(9))
        want = plan_eviction(positions, acc, policy, budget, 32, 128, 600, 16,
                             np.random.default_rng(9))
        assert counts == (want.num_sinks, want.num_recent, want.num_keep)
        for layer in range(len(positions)):
            for h in range(len(positions[0])):
                assert np.array_equal(got[layer][h], want.keep_rows[layer][h])
        # the budget is exact over the sequence (policies move it between layers and heads)
        assert sum(len(r) for row in got for r in row) == budget * 4 * 3


def test_plan_event_errors() -> None:
    positions, scores = cached_rows(3, "sorted")
    policy = make_policy(CacheEvictionConfig())
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="eviction budget 100 < sinks 32 [+] recent 128"):
        plan_in_cpp(positions, scores, policy, 100, 32, 128, 600, 16, rng)
    with pytest.raises(ValueError, match="exceeds the cached tokens"):
        plan_in_cpp(positions, scores, policy, 601, 32, 128, 600, 16, rng)
    shifted = [[p + (h == 1) for h, p in enumerate(row)] for row in positions]
    with pytest.raises(RuntimeError, match="sinks / recent window differ"):
        plan_in_cpp(shifted, scores, policy, 300, 32, 128, 600, 16, rng)
    with pytest.raises(AssertionError, match="^eviction: sinks / recent window differ"):
        plan_eviction(shifted, scores, policy, 300, 32, 128, 600, 16, rng)  # as it always did


def test_event_planner_reused_across_events_matches_the_python_planner() -> None:
    """One _core.EventPlanner (kvcrush::PlanWorkspace, buffers kept) over events of different
    shapes, in and out of position order, through planner.plan_event (the evictor's path), the
    core's selection and a Python policy's called back in turn: the rows of plan_eviction every
    time, and runs_in_core only for core policies."""
    from kvcrush_ov.eviction.planner import plan_event, runs_in_core

    planner = _core.EventPlanner()
    for seed, (kind, layers, heads) in enumerate([("sorted", 4, 3), ("ragged", 2, 2),
                                                   ("holes", 4, 3), ("sorted", 3, 1)]):
        positions, scores = cached_rows(seed, kind, layers, heads)
        for name, factory in PLANNED:
            policy = factory()
            assert runs_in_core(policy)
            flat = [p for row in positions for p in row]
            offsets = np.concatenate([[0], np.cumsum([len(p) for p in flat])]).astype(np.int64)
            want = plan_eviction(positions, scores, policy, 300, 32, 128, 600, 16,
                                 np.random.default_rng(seed))
            for planned in (policy, Delegate(policy)):
                got = plan_event(planner, np.concatenate(flat), offsets, heads, scores, planned,
                                 300, 32, 128, 600, 16, np.random.default_rng(seed))
                assert (got.num_sinks, got.num_recent, got.num_keep) == \
                    (want.num_sinks, want.num_recent, want.num_keep)
                rows = got.keep_rows(heads)
                for layer in range(layers):
                    for h in range(heads):
                        assert np.array_equal(rows[layer][h], want.keep_rows[layer][h]), \
                            (name, kind, layer, h)
    assert not runs_in_core(object())
    assert not runs_in_core(Delegate(make_policy(CacheEvictionConfig())))


@dataclass(frozen=True)
class Delegate:
    """A user-written policy (base.EvictionPolicy, not the core's): answers with ``inner``'s keep
    mask, computed in Python's hands (a copy), after ``inner``'s for_budget where it has one."""

    inner: object
    name: ClassVar[str] = "delegate"
    score_mode: ClassVar[str] = "window"

    def for_budget(self, total: int, num_keep: int, num_written: int = 0) -> Delegate:
        inner = self.inner
        return Delegate(inner.for_budget(total, num_keep, num_written)
                        if hasattr(inner, "for_budget") else inner)

    def select(self, inputs: EvictionInputs, num_keep: int,
               rng: np.random.Generator) -> np.ndarray:
        return np.array(self.inner.select(inputs, num_keep, rng), dtype=bool, order="F")


@pytest.mark.parametrize("kind", ["sorted", "holes", "ragged"])
@pytest.mark.parametrize(("name", "factory"), PLANNED, ids=[n for n, _ in PLANNED])
def test_a_python_policy_called_back_plans_as_the_core(name: str, factory, kind: str) -> None:
    """The evictor's path for a Python policy (plan_event calling its select back) keeps the
    rows of the core's selection when the Python policy answers the core's mask; the policy
    saw the candidates plan_eviction reports."""
    from kvcrush_ov.eviction.planner import plan_event, runs_in_core

    positions, scores = cached_rows(4, kind)
    policy = factory()
    mine = Delegate(policy)
    assert runs_in_core(policy) and not runs_in_core(mine)
    acc = None if name == "streaming" else scores
    flat = [p for row in positions for p in row]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in flat])]).astype(np.int64)
    planner = _core.EventPlanner()
    for budget in (160, 300, 472):  # 472: every candidate of the shortest head stays
        args = (budget, 32, 128, 600, 16)
        try:
            core = plan_event(planner, np.concatenate(flat), offsets, 3, acc, policy, *args,
                              np.random.default_rng(1))
        except ValueError as e:  # the budget exceeds what a ragged head holds
            with pytest.raises(ValueError, match=str(e)):
                plan_event(planner, np.concatenate(flat), offsets, 3, acc, mine, *args,
                           np.random.default_rng(1))
            continue
        called = plan_event(planner, np.concatenate(flat), offsets, 3, acc, mine, *args,
                            np.random.default_rng(1))
        assert np.array_equal(called.rows, core.rows)
        assert np.array_equal(called.offsets, core.offsets)
        assert (called.num_sinks, called.num_recent, called.num_keep) == \
            (core.num_sinks, core.num_recent, core.num_keep)
        decision = plan_eviction(positions, acc, mine, *args, np.random.default_rng(1))
        assert decision.keep.dtype == np.bool_ and decision.positions.dtype == np.int64
        for layer in range(4):
            for h in range(3):
                n = int((decision.positions[layer, h] >= 0).sum())
                p = np.sort(positions[layer][h])[32:len(positions[layer][h]) - 128]
                assert np.array_equal(decision.positions[layer, h, :n], p)
                kept = np.sort(positions[layer][h][decision.keep_rows[layer][h]])
                assert set(decision.positions[layer, h][decision.keep[layer, h]]) <= set(kept)


@dataclass(frozen=True)
class Answers:
    """A user-written policy answering ``mask(inputs, num_keep)``."""

    mask: object
    name: ClassVar[str] = "mine"
    score_mode: ClassVar[str] = "none"

    def select(self, inputs: EvictionInputs, num_keep: int,
               rng: np.random.Generator) -> np.ndarray:
        return self.mask(inputs, num_keep)


def newest(inputs: EvictionInputs, num_keep: int) -> np.ndarray:
    """The ``num_keep`` newest candidates of every (layer, head)."""
    idx = np.arange(inputs.shape[2])
    n = inputs.lengths[:, :, None]
    return (idx >= n - num_keep) & (idx < n)


def padded(inputs: EvictionInputs, num_keep: int) -> np.ndarray:
    """newest, but one padding entry instead of a candidate (the count stays right)."""
    keep = newest(inputs, num_keep)
    layer, h = np.unravel_index(np.argmin(inputs.lengths), inputs.lengths.shape)
    n = int(inputs.lengths[layer, h])
    keep[layer, h, n] = True
    keep[layer, h, n - 1] = False
    return keep


class Broken(Exception):
    pass


def broken(inputs: EvictionInputs, num_keep: int) -> np.ndarray:
    raise Broken("the policy failed")


BAD_MASKS = [
    ("dtype", lambda i, k: newest(i, k).astype(np.uint8),
     r"mine: keep must be bool \(4, 3, \d+\), got uint8 \(4, 3, \d+\)$"),
    ("shape", lambda i, k: newest(i, k)[:, :2],
     r"mine: keep must be bool \(4, 3, (\d+)\), got bool \(4, 2, \1\)$"),
    ("count", lambda i, k: newest(i, k + 1),
     r"mine: kept \d+ candidates, the budget is exactly \d+ \(\d+ per layer and head\)$"),
    ("count-short", lambda i, k: np.zeros(i.shape, bool),
     r"mine: kept 0 candidates, the budget is exactly 1032 \(86 per layer and head\)$"),
    ("padding", padded, r"mine: keeps a padding entry$"),
]


@pytest.mark.parametrize(("what", "mask", "message"), BAD_MASKS, ids=[b[0] for b in BAD_MASKS])
def test_a_python_policys_bad_mask_is_named(what: str, mask, message: str) -> None:
    """kvcrush::plan_event checks a Python policy's answer as base.check_keep does (the same
    messages; _core.PlanError, an AssertionError), on both Python entry points, and
    check_keep itself says the same."""
    from kvcrush_ov.eviction.planner import plan_event

    positions, scores = cached_rows(5, "ragged")
    policy = Answers(mask)
    flat = [p for row in positions for p in row]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in flat])]).astype(np.int64)
    with pytest.raises(_core.PlanError, match=message) as raised:
        plan_eviction(positions, scores, policy, 246, 32, 128, 600, 16, np.random.default_rng(0))
    assert isinstance(raised.value, AssertionError)
    with pytest.raises(AssertionError, match=message):
        plan_event(_core.EventPlanner(), np.concatenate(flat), offsets, 3, scores, policy, 246,
                   32, 128, 600, 16, np.random.default_rng(0))
    inputs = EvictionInputs.from_lists([[np.zeros(len(p) - 160, np.float32) for p in row]
                                        for row in positions],
                                       [[np.sort(p)[32:-128] for p in row] for row in positions])
    with pytest.raises(AssertionError, match=message):
        check_keep(mask(inputs, 86), inputs, 86, "mine")
    check_keep(newest(inputs, 86), inputs, 86, "mine")


def test_errors_of_a_python_policy_pass_through_and_the_planner_is_reusable() -> None:
    """What a policy's select raises reaches the caller unchanged (through C++ and back); the
    planner then plans the next event as usual; a policy without a name is named by its
    class."""
    from kvcrush_ov.eviction.planner import plan_event

    positions, scores = cached_rows(6, "holes")
    flat = [p for row in positions for p in row]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in flat])]).astype(np.int64)
    planner = _core.EventPlanner()
    args = (np.concatenate(flat), offsets, 3, scores)
    with pytest.raises(Broken, match="the policy failed"):
        plan_event(planner, *args, Answers(broken), 300, 32, 128, 600, 16,
                   np.random.default_rng(0))

    class Unnamed:
        score_mode = "none"

        def select(self, inputs, num_keep, rng):
            return newest(inputs, num_keep).view(np.int8)

    with pytest.raises(AssertionError, match="^Unnamed: keep must be bool"):
        plan_event(planner, *args, Unnamed(), 300, 32, 128, 600, 16, np.random.default_rng(0))
    got = plan_event(planner, *args, Answers(newest), 300, 32, 128, 600, 16,
                     np.random.default_rng(0))
    streaming = make_policy(CacheEvictionConfig(importance="streaming", kvcrush=None))
    want = plan_event(planner, *args, streaming, 300, 32, 128, 600, 16, np.random.default_rng(0))
    assert np.array_equal(got.rows, want.rows) and np.array_equal(got.offsets, want.offsets)


def test_inputs_a_policy_or_a_decision_keeps_are_never_overwritten() -> None:
    """The planner writes the next event's candidates into the arrays a Python policy received
    only when nothing holds them any more: inputs a policy keeps, and a decision's positions /
    keep, stay as they were after later events (plan_event and plan_eviction)."""
    from kvcrush_ov.eviction.planner import plan_event

    kept: list[tuple[EvictionInputs, np.ndarray]] = []

    def remember(inputs: EvictionInputs, num_keep: int) -> np.ndarray:
        keep = newest(inputs, num_keep)
        kept.append((inputs, inputs.positions.copy()))
        return keep

    planner = _core.EventPlanner()
    decisions = []
    for seed, kind in enumerate(["sorted", "holes", "ragged", "sorted", "sorted"]):
        positions, scores = cached_rows(seed, kind)
        flat = [p for row in positions for p in row]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in flat])]).astype(np.int64)
        plan_event(planner, np.concatenate(flat), offsets, 3, scores, Answers(remember), 300,
                   32, 128, 600, 16, np.random.default_rng(0))
        plan_event(planner, np.concatenate(flat), offsets, 3, scores, Answers(newest), 300,
                   32, 128, 600, 16, np.random.default_rng(0))  # arrays nobody keeps: reused
        d = plan_eviction(positions, scores, Answers(newest), 300 - seed, 32, 128, 600, 16,
                          np.random.default_rng(0))
        decisions.append((d, d.positions.copy(), d.keep.copy()))
    assert len({id(inputs.positions) for inputs, _ in kept}) == len(kept)
    for inputs, positions in kept:
        assert np.array_equal(inputs.positions, positions)
    for d, positions, keep in decisions:
        assert np.array_equal(d.positions, positions) and np.array_equal(d.keep, keep)
