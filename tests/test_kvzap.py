"""KVzap: the surrogate's scores come out of the engine's graphs, one per computed token, as a
torch reference computes them; training writes a loadable surrogate; bad input is named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvcrush_ov.config import CacheEvictionConfig, GenerationConfig, KVCacheConfig, SchedulerConfig
from kvcrush_ov.engine.engine import LLMEngine
from kvcrush_ov.errors import ConfigError
from kvcrush_ov.eviction.factory import make_spec
from kvcrush_ov.kvzap.train import (
    STEP,
    Normal,
    fit,
    fit_mlp,
    kvzip_step_target,
    save,
    text_floor,
    train,
)
from kvcrush_ov.kvzap.weights import KVzapWeights
from kvcrush_ov.transformations.kvzap import add_kvzap


def _surrogate(tmp_path: Path, tiny_model: Path, seed: int = 0,
               shape: tuple[int, int, int] = (4, 256, 2), mlp: int | None = None,
               skip: bool = False) -> Path:
    """A model folder (the tiny model linked in) with a random surrogate beside it (linear, or
    an MLP of width ``mlp``, with a linear skip if ``skip``)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / tiny_model.name).symlink_to(tiny_model)
    rng = np.random.default_rng(seed)
    layers, dim, heads = shape
    first = mlp or heads
    two = {} if mlp is None else {
        "weight2": (rng.normal(size=(layers, mlp, heads)) * 0.2).astype(np.float32),
        "bias2": rng.normal(size=(layers, heads)).astype(np.float32)}
    if skip:
        two["skip"] = (rng.normal(size=(layers, dim, heads)) * 0.05).astype(np.float32)
    save(folder / "kvzap.npz", (rng.normal(size=(layers, dim, first)) * 0.05).astype(np.float32),
         rng.normal(size=(layers, first)).astype(np.float32), "kvzip+", {}, **two)
    return folder / tiny_model.name


def _cfg(**kw) -> CacheEvictionConfig:
    return CacheEvictionConfig(**{"max_cache_size": 0.25, "importance": "kvzap",
                                  "start_size": 4, "recent_size": 8, **kw})


def _engine(model_dir: Path, cfg: CacheEvictionConfig) -> LLMEngine:
    return LLMEngine(model_dir, "CPU", KVCacheConfig(precision="f32"),
                     SchedulerConfig(max_num_batched_tokens=64), context_length=2048,
                     eviction=make_spec(cfg, model_dir))


def _watch(eng) -> list:
    """The scores every eviction sees, copied just before it uses them."""
    caught: list = []
    evict = eng.evictor.evict

    def watch(seq) -> None:
        caught.append([[a.copy() for a in row] for row in seq.extra["scores"].acc])
        evict(seq)

    eng.evictor.evict = watch
    return caught


def _reference(hf_dir: Path, ids: list[int], weights: KVzapWeights) -> list[np.ndarray]:
    """Per layer [T, Hkv]: x_l @ W + b from transformers (x_l: the attention's input)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    xs: dict[int, np.ndarray] = {}

    def hook(module, args, kwargs):
        xs[module.layer_idx] = kwargs["hidden_states"][0].double().numpy()

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
               for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    out = []
    for layer in range(weights.num_layers):
        y = xs[layer] @ weights.weight[layer] + weights.bias[layer]
        if weights.hidden is not None:
            y = torch.nn.functional.gelu(torch.from_numpy(y)).numpy()
            y = y @ weights.weight2[layer] + weights.bias2[layer]
            if weights.skip is not None:
                y = y + xs[layer] @ weights.skip[layer]
        out.append(y)
    return out


@pytest.mark.parametrize(("mlp", "skip"), [(None, False), (16, False), (16, True)])
def test_every_prompt_token_is_scored_by_the_graph_as_the_torch_reference(tiny_model, tmp_path,
                                                                          mlp, skip):
    model_dir = _surrogate(tmp_path, tiny_model, mlp=mlp, skip=skip)
    eng = _engine(model_dir, _cfg())
    caught = _watch(eng)
    ids = np.random.default_rng(1).integers(11, 500, 200).tolist()  # 4 steps of 64
    eng.add_request(ids, GenerationConfig(max_new_tokens=2), set(), lambda t: "")
    while eng.has_unfinished():
        eng.step()
    assert len(caught) == 1 and eng.evictor.stats.events == 1
    weights = KVzapWeights.load(model_dir.parent / "kvzap.npz")
    ref = _reference(tiny_model.parent / "hf", ids, weights)
    for layer, row in enumerate(caught[0]):
        for h, acc in enumerate(row):
            assert len(acc) == len(ids)
            np.testing.assert_allclose(np.log(acc), ref[layer][:, h], atol=0.03, rtol=0.02)


def test_a_second_chat_turn_ranks_the_first_turns_answer_too(tiny_model, tmp_path):
    """Decode tokens are scored by the decode graph and kept across turns: every row of the
    second turn's eviction has a score."""
    import kvcrush_ov

    pipe = kvcrush_ov.Pipeline(_surrogate(tmp_path, tiny_model), backend="native",
                               eviction=_cfg())
    caught = _watch(pipe.backend.engine)
    g = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    pipe.start_chat()
    pipe.generate(" ".join(f"w{i}" for i in range(120)), g)
    pipe.generate(" ".join(f"v{i}" for i in range(120)), g)
    pipe.finish_chat()
    assert len(caught) == 2
    for row in caught[1]:
        for acc in row:
            assert len(acc) > 200 and (acc > 0).all()


def test_the_surrogate_graph_changes_nothing_else(tiny_model, tmp_path):
    """Same tokens as the engine without it, on a prompt that fits (no eviction)."""
    ids = np.random.default_rng(2).integers(11, 500, 40).tolist()
    out = []
    for cfg, model_dir in ((_cfg(max_cache_size=4096), _surrogate(tmp_path, tiny_model)),
                           (CacheEvictionConfig(max_cache_size=4096), tiny_model)):
        eng = _engine(model_dir, cfg)
        seq = eng.add_request(ids, GenerationConfig(max_new_tokens=8, ignore_eos=True), set(),
                              lambda t: "")
        while eng.has_unfinished():
            eng.step()
        out.append(list(seq.output_ids))
    assert out[0] == out[1]


@pytest.mark.parametrize(("hidden", "target", "censor"), [
    (None, "kvzip", False), (8, "kvzip", False), (8, "kvzip-step", True)])
def test_training_writes_a_surrogate_the_engine_loads(tiny_model, tmp_path, hidden, target,
                                                      censor):
    out = tmp_path / "kvzap.npz"
    path, r2 = train(tiny_model.parent / "hf", num_texts=2, num_test=1, min_tokens=60,
                     max_tokens=120, out=out, facts_per_doc=0.5, hidden=hidden,
                     keep_per_text=32, target=target, censor=censor,
                     censor_quantile=0.75 if censor else 0.5, log=lambda *_: None)
    w = KVzapWeights.load(path)
    assert w.hidden == hidden and w.num_kv_heads == 2 and w.num_layers == 4
    assert w.weight.shape == (4, 256, hidden or 2)
    assert (w.skip is None) == (hidden is None)  # the MLP is residual on a linear map
    if hidden is not None:
        assert w.skip.shape == (4, 256, 2)
    assert len(r2) == 4 and all(np.isfinite(r2))
    assert w.meta["texts"] == 2 and w.target == target and w.meta["hidden"] == hidden
    assert w.meta["censor"] == censor
    assert w.meta["censor_quantile"] == (0.75 if censor else None)
    w.check_model(4, 256, 2)


def test_the_step_target_is_the_engines_replay_score():
    """kvzip_step_target: per KV head, the largest sum over an aligned step of STEP replay
    queries (from the repeat prompt) and the head's query group, as the engine's KVzip ranks;
    a loop over the steps is the reference. STEP is the engine's replay step."""
    import torch

    from kvcrush_ov.eviction.kvzip import REPLAY_CHUNK

    assert STEP == REPLAY_CHUNK
    rng = np.random.default_rng(0)
    hq, hkv, t = 4, 2, 60
    attn = torch.from_numpy(rng.random((hq, t, t)))
    c0, c1, q0, q1 = 1, 20, 20, 60  # 40 queries: two full steps of 16 and one of 8
    got = kvzip_step_target(attn, (c0, c1, q0, q1), hkv).numpy()
    a = attn.numpy()
    ref = np.zeros((c1 - c0, hkv))
    for k in range(hkv):
        heads = a[2 * k:2 * k + 2, :, c0:c1].sum(0)  # [T, N]
        ref[:, k] = np.max([heads[s:min(s + STEP, q1)].sum(0) for s in range(q0, q1, STEP)],
                           axis=0)
    assert got.shape == (c1 - c0, hkv)
    np.testing.assert_allclose(got, np.log(ref), rtol=1e-10)
    ys = [np.array([[1.0, 5.0]]), np.array([[2.0, 3.0]])]
    assert text_floor(ys) == 2.5 and text_floor(ys, 0.75) == 3.5  # over all layers and heads


def _synthetic(rng: np.random.Generator, texts: int, rows: int = 200) -> dict:
    """One layer's collected data (collect()'s layout) where the target is partly non-linear:
    y = x @ a + 2 |x_0| (two heads), plus noise."""
    a = rng.normal(size=(6, 2))

    def text() -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(rows, 6))
        y = x @ a + 2 * np.abs(x[:, :1]) + 0.05 * rng.normal(size=(rows, 2))
        return x, y

    train_, test_ = [text() for _ in range(texts)], [text() for _ in range(2)]
    ne = Normal(np.zeros((7, 7)), np.zeros((7, 2)))
    for x, y in train_:
        ne.add(x, y)
    return {"num_layers": 1, "normal": {"kvzip": [ne]},
            "kept_x": [[x.astype(np.float32) for x, _ in train_]],
            "kept": {"kvzip": [[y.astype(np.float32) for _, y in train_]]},
            "test_x": [[x for x, _ in test_]], "test": {"kvzip": [[y for _, y in test_]]}}


def test_the_residual_mlp_starts_as_the_ridge_map_and_learns_what_it_misses():
    data = _synthetic(np.random.default_rng(0), texts=10)
    w, b, r2_lin = fit(data, "kvzip")
    untrained, r2_0 = fit_mlp(data, "kvzip", hidden=16, epochs=0, log=lambda *_: None)
    # no epoch: the skip is the ridge map of the training texts but the last (validation) one
    assert untrained["skip"].shape == (1, 6, 2) and not untrained["w2"].any()
    assert abs(r2_0[0] - r2_lin[0]) < 0.02
    mlp, r2 = fit_mlp(data, "kvzip", hidden=16, epochs=40, lr=3e-3, log=lambda *_: None)
    assert r2_lin[0] < 0.9 and r2[0] > r2_lin[0] + 0.05
    # the folded arrays predict what the trained model predicted (held-out R^2 recomputed)
    x, y = np.concatenate(data["test_x"][0]), np.concatenate(data["test"]["kvzip"][0])
    import torch
    h = torch.nn.functional.gelu(torch.from_numpy(x @ mlp["w1"][0] + mlp["b1"][0])).numpy()
    pred = h @ mlp["w2"][0] + mlp["b2"][0] + x @ mlp["skip"][0]
    assert 1 - ((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum() == pytest.approx(r2[0],
                                                                                      abs=1e-4)


def test_a_censored_fit_is_the_fit_of_the_raised_scores():
    """censor=True trains on each text's targets raised to its floor (the ridge start too) and
    scores the held-out texts with truth and prediction raised alike: the same arrays as a
    plain fit on pre-raised targets, and an R^2 recomputed from them."""
    import torch

    data = _synthetic(np.random.default_rng(1), texts=6)
    floors = [float(np.median(y)) for y in data["kept"]["kvzip"][0]]
    tfloors = [float(np.median(y)) for y in data["test"]["kvzip"][0]]
    data["kept_floor"], data["test_floor"] = {"kvzip": floors}, {"kvzip": tfloors}
    raised = {**data, "kept": {"kvzip": [[np.maximum(y, f) for y, f in
                                          zip(data["kept"]["kvzip"][0], floors, strict=True)]]}}
    quiet = {"hidden": 8, "epochs": 5, "log": lambda *_: None}
    cens, r2 = fit_mlp(data, "kvzip", censor=True, **quiet)
    plain, r2_plain = fit_mlp(raised, "kvzip", **quiet)
    for k in cens:
        np.testing.assert_allclose(cens[k], plain[k], rtol=1e-5, atol=1e-6)
    x = np.concatenate(data["test_x"][0])
    floor = np.repeat(tfloors, [len(y) for y in data["test"]["kvzip"][0]])[:, None]
    y = np.maximum(np.concatenate(data["test"]["kvzip"][0]), floor)
    h = torch.nn.functional.gelu(torch.from_numpy(x @ cens["w1"][0] + cens["b1"][0])).numpy()
    pred = np.maximum(h @ cens["w2"][0] + cens["b2"][0] + x @ cens["skip"][0], floor)
    assert 1 - ((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum() == pytest.approx(r2[0],
                                                                                      abs=1e-4)
    assert r2[0] != pytest.approx(r2_plain[0], abs=1e-6)  # the plain fit scores the raw rows


def test_a_skip_without_an_mlp_is_refused_by_name():
    with pytest.raises(ConfigError, match="skip") as err:
        KVzapWeights(np.zeros((2, 8, 3), np.float32), np.zeros((2, 3), np.float32),
                     skip=np.zeros((2, 8, 3), np.float32))
    assert err.value.field == "kvzap.weights"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"num_texts": 0}, "texts"), ({"target": "snapkv"}, "target"),
    ({"min_tokens": 300, "max_tokens": 200}, "max_tokens"), ({"lam": 0}, "lam"),
    ({"facts_per_doc": 2}, "facts_per_doc"), ({"hidden": 0}, "hidden"),
    ({"hidden": 8, "keep_per_text": 0}, "keep_per_text"), ({"censor": True}, "censor"),
    ({"hidden": 8, "censor": "yes"}, "censor"),
    ({"hidden": 8, "censor": True, "censor_quantile": 1.0}, "censor_quantile")])
def test_training_refuses_bad_arguments_by_name(tiny_model, kwargs, field):
    with pytest.raises(ConfigError) as err:
        train(tiny_model.parent / "hf", **kwargs)
    assert err.value.field == field


def test_the_cli_names_a_bad_censor_quantile(tiny_model, tmp_path, capsys):
    from kvcrush_ov.cli import main

    assert main(["kvzap-train", "--model", "tiny-random-llama", "--hidden", "8", "--censor",
                 "--censor-quantile", "1.5", "--out", str(tmp_path / "k.npz")]) == 2
    assert "censor_quantile" in capsys.readouterr().err
    assert not (tmp_path / "k.npz").exists()


def test_the_recipe_makes_the_measured_kind_of_surrogate(tiny_model, tmp_path, monkeypatch):
    """``kvcrush-ov kvzap-train --recipe``: texts, the residual MLP on the replay-step target
    with each text's floor, then (where the model's recipe has one) the distance term, all
    through kvzap/gpu.py's steps; the result loads and fits the model."""
    from kvcrush_ov.cli import main
    from kvcrush_ov.kvzap import gpu

    out = tmp_path / "kvzap.npz"
    monkeypatch.setitem(gpu.RECIPES, "tiny-random-llama", gpu.Recipe(6, 0.75, 1))
    assert gpu.recipe("tiny-random-llama", out=out, tokens=(100, 200)) == out  # short texts
    w = KVzapWeights.load(out)
    w.check_model(4, 256, 2)
    assert w.target == "kvzip-step" and w.hidden == 128 and w.meta["grid"] == "text"
    assert w.meta["censor_quantile"] == 0.75 and w.meta["texts"] == 4  # 2 of 6 held out
    assert w.position.shape == (4, 1, 2) and w.meta["position"]["texts"] == 2
    plain = tmp_path / "plain.npz"  # a model without a recipe: SmolLM2's, no distance term
    monkeypatch.delitem(gpu.RECIPES, "tiny-random-llama")
    assert main(["kvzap-train", "--model", "tiny-random-llama", "--recipe", "--texts", "5",
                 "--out", str(plain)]) == 0
    p = KVzapWeights.load(plain)
    assert p.position is None and p.meta["censor_quantile"] == 0.5 and p.meta["texts"] == 3
    for tokens in ((8, 100), (200, 100), (100.0, 200), (100,)):  # named before any work
        with pytest.raises(ConfigError, match="tokens"):
            gpu.recipe("tiny-random-llama", out=tmp_path / "bad.npz", tokens=tokens)
    assert not (tmp_path / "bad.npz").exists()


@pytest.mark.parametrize(("args", "field"), [
    (["--recipe", "--hidden", "8"], "--hidden"), (["--recipe", "--censor"], "--censor"),
    (["--recipe", "--texts", "3"], "texts"), (["--recipe", "--device", "tpu"], "device"),
    (["--recipe", "--min-tokens", "100"], "--min-tokens"), (["--recipe", "--seed", "1"], "--seed"),
    (["--device", "cuda"], "--device")])
def test_the_cli_recipe_names_a_bad_option_before_any_work(tiny_model, tmp_path, capsys, args,
                                                           field):
    from kvcrush_ov.cli import main

    out = tmp_path / "k.npz"
    assert main(["kvzap-train", "--model", "tiny-random-llama", "--out", str(out), *args]) == 2
    assert field in capsys.readouterr().err
    assert not out.exists()


def test_the_distance_term_is_each_rows_polynomial_in_its_log_distance():
    rng = np.random.default_rng(3)
    layers, dim, heads = 3, 8, 2
    w = KVzapWeights(rng.normal(size=(layers, dim, heads)).astype(np.float32),
                     rng.normal(size=(layers, heads)).astype(np.float32),
                     position=rng.normal(size=(layers, 2, heads)).astype(np.float32))
    lens = rng.integers(1, 9, size=layers * heads)
    offsets = np.r_[0, np.cumsum(lens)]
    positions = np.concatenate([np.sort(rng.choice(40, n, replace=False)) for n in lens])
    got = w.log_offset(positions, offsets, written=40)
    for r in range(layers * heads):
        layer, h = divmod(r, heads)
        for i in range(offsets[r], offsets[r + 1]):
            ld = np.log(40 - positions[i])
            want = w.position[layer, 0, h] * ld + w.position[layer, 1, h] * ld ** 2
            assert got[i] == pytest.approx(want, rel=1e-5, abs=1e-6)
    plain = KVzapWeights(w.weight, w.bias)
    assert not plain.log_offset(positions, offsets, 40).any()
    with pytest.raises(ConfigError, match="position") as err:
        KVzapWeights(w.weight, w.bias, position=np.zeros((layers, 1, heads + 1), np.float32))
    assert err.value.field == "kvzap.weights"


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_distance_term_ranks_the_rows_when_the_predictions_tie(tiny_model, tmp_path, sign):
    """Every prediction equal (zero weights): the distance term alone decides, so a positive
    coefficient keeps the rows farthest from the prompt's end, a negative one the nearest."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / tiny_model.name).symlink_to(tiny_model)
    save(folder / "kvzap.npz", np.zeros((4, 256, 2), np.float32), np.zeros((4, 2), np.float32),
         "kvzip", {}, position=np.full((4, 1, 2), sign, np.float32))
    model_dir = folder / tiny_model.name
    assert KVzapWeights.load(folder / "kvzap.npz").position is not None
    eng = _engine(model_dir, _cfg(kvcrush=None))  # the importance's own choice only
    kept: list[list[np.ndarray]] = []
    evict = eng.evictor.evict

    def watch(seq) -> None:
        evict(seq)
        t = eng.kv.tables[seq.seq_id]
        kept.append([t.positions_of(layer, h) for layer in range(4) for h in range(2)])

    eng.evictor.evict = watch
    prompt = list(range(11, 131))
    eng.add_request(prompt, GenerationConfig(max_new_tokens=3), set(), lambda t: "")
    while eng.has_unfinished():
        eng.step()
    assert kept
    middle = set(range(4, len(prompt) - 8))  # neither sink nor recent
    for rows in kept[0]:
        mid = sorted(middle & set(rows.tolist()))
        gone = sorted(middle - set(mid))
        assert mid and gone
        if sign > 0:
            assert mid[-1] < gone[0]  # the farthest from the end stay
        else:
            assert mid[0] > gone[-1]  # the nearest stay


def test_a_missing_or_foreign_surrogate_is_named(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="kvzap-train") as err:
        make_spec(_cfg(), tiny_model)  # nothing trained beside the cached tiny model
    assert err.value.field == "kvzap.weights"
    other = _surrogate(tmp_path, tiny_model, shape=(4, 128, 2))
    with pytest.raises(ConfigError, match="another model") as err:
        make_spec(_cfg(), other)
    assert err.value.field == "kvzap.weights"
    with pytest.raises(ConfigError) as err:
        make_spec(_cfg())  # no model folder to find it in
    assert err.value.field == "kvzap.weights"


def test_an_engine_without_the_surrogate_refuses_a_kvzap_request(tiny_model, tmp_path):
    spec = make_spec(_cfg(), _surrogate(tmp_path, tiny_model))
    eng = _engine(tiny_model, CacheEvictionConfig(max_cache_size=0.25))
    seq = eng.add_request(list(range(11, 60)), GenerationConfig(max_new_tokens=2), set(),
                          lambda t: "")
    with pytest.raises(ConfigError, match="without KVzap") as err:
        eng.evictor.set_spec(seq, spec)
    assert err.value.field == "eviction.importance"


def test_kvzap_with_fastkv_is_refused_by_name():
    from kvcrush_ov.config import FastKVConfig

    with pytest.raises(ConfigError) as err:
        _cfg(fastkv=FastKVConfig())
    assert err.value.field == "eviction.importance"


def test_the_graph_rewrite_checks_the_weights_fit(tiny_model):
    from kvcrush_ov.transformations.paged import read_paged_model

    model = read_paged_model(tiny_model / "openvino_model.xml")
    with pytest.raises(ValueError, match="3 layers of weights"):
        add_kvzap(model, np.zeros((3, 256, 2), np.float32), np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="width 256"):
        add_kvzap(model, np.zeros((4, 100, 2), np.float32), np.zeros((4, 2), np.float32))


def test_buffered_tails_read_as_written_one_by_one():
    """put_tails buffers decode steps and writes them when acc is read, a step that does not
    follow the last one arrives, or PENDING_TOKENS wait: the same rows as put_tail each."""
    from kvcrush_ov.eviction.scores import SequenceScores

    rng = np.random.default_rng(0)
    lazy, eager = SequenceScores(2, 3, "max"), SequenceScores(2, 3, "max")
    rows = np.array([[10, 12, 11], [11, 10, 10]])
    steps = [(rows, 10)] + [(None, 1)] * 70 + [("gap", 1)] + [(None, 1)] * 5
    for kind, n in steps:
        if isinstance(kind, str):  # rows jump (a token the table skipped): not contiguous
            rows = rows + 2
        elif kind is None:
            rows = rows + 1
        values = rng.random((2, n, 3)).astype(np.float32)
        lazy.put_tails(values, rows)
        for layer in range(2):
            for h in range(3):
                eager.put_tail(layer, h, values[layer, :, h], int(rows[layer, h]))
    for a_row, b_row in zip(lazy.acc, eager.acc, strict=True):
        for a, b in zip(a_row, b_row, strict=True):
            np.testing.assert_array_equal(a, b)
    assert lazy._pending == []  # read: written


def test_kvzap_columns_run_in_the_query_agnostic_eval(tiny_model, tmp_path):
    """The eval's surrogate groups: one parent predicts per question window, every KVzap column
    branches from its own; FastKV columns beside them are refused by name (one engine cannot
    hold both graphs)."""
    import json

    from kvcrush_ov.eval.runner import FULL, run_eval

    model_dir = _surrogate(tmp_path, tiny_model)
    out = tmp_path / "run"
    run_eval(str(model_dir), out, tasks=["vt"], num_samples=1,
             methods=["kvzap", "kvzap+kvcrush", "kvzap-qw16", "snapkv"], budgets=[0.25, 0.125],
             max_seq_length=1024, max_num_batched_tokens=128, protocol="query-agnostic",
             say=lambda _: None)
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["method"], r["budget"]) for r in recs} == {
        (FULL, None), *((m, b) for m in ("kvzap", "kvzap+kvcrush", "kvzap-qw16", "snapkv")
                        for b in (0.25, 0.125))}
    by = {(r["method"], r["budget"]): r["kv_bytes"] for r in recs}
    assert by[("kvzap", 0.125)] < by[("kvzap", 0.25)] < by[(FULL, None)]
    with pytest.raises(ConfigError, match="KVzap columns and FastKV columns"):
        run_eval(str(model_dir), tmp_path / "x", tasks=["vt"], methods=["kvzap", "fastkv"],
                 say=lambda _: None)


def test_kvzap_selects_as_kvzip_and_training_leaves_autograd_on(tiny_model, tmp_path):
    """KVzap ranks predicted scores exactly as KVzip ranks replay scores; training (which runs
    torch without gradients) leaves the caller's autograd as it was."""
    import torch
    from test_eviction_policies import CASES, budgets, make_inputs

    from kvcrush_ov.eviction.kvzap import KVzap
    from kvcrush_ov.eviction.kvzip import KVzip

    for kind, seed in CASES:
        inputs = make_inputs(kind, seed)
        for k in budgets(inputs):
            np.testing.assert_array_equal(
                KVzap().select(inputs, k, np.random.default_rng(0)),
                KVzip().select(inputs, k, np.random.default_rng(0)))
    assert torch.is_grad_enabled()
    train(tiny_model.parent / "hf", num_texts=1, num_test=1, min_tokens=40, max_tokens=60,
          out=tmp_path / "kvzap.npz", log=lambda *_: None)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("calib", ["none", "quantile"])
def test_a_partial_replay_scores_its_spans_by_the_replay_and_the_rest_by_the_surrogate(
        tiny_model, tmp_path, monkeypatch, calib):
    """The eval's partial replay (a tuning candidate, eval.runner._replay_partial): the spans
    the surrogate scores highest are replayed as lanes; their rows take the replay's scores,
    every other row keeps its prediction (``quantile``: mapped onto the replay's scores,
    keeping its order)."""
    import dataclasses

    from kvcrush_ov.eval import runner

    model_dir = _surrogate(tmp_path, tiny_model)
    monkeypatch.setitem(runner.PARTIAL_REPLAY, "test", (0.25, 64, 8, calib))
    ids = np.random.default_rng(4).integers(11, 500, 256).tolist()
    eng = _engine(model_dir, _cfg())
    spec = dataclasses.replace(make_spec(_cfg(), model_dir), max_cache_size=10**9,
                               mode="continuous", log=False)
    parent = eng.add_request(ids, GenerationConfig(max_new_tokens=1), set(), lambda t: "",
                             keep_cache=True)
    eng.set_spec(parent, spec)
    while eng.has_unfinished():
        eng.step()
    pred = np.array([[a[:256].copy() for a in row] for row in parent.extra["scores"].acc])
    runner._replay_partial(eng, parent, ids, [7, 8, 9, 10], set(), lambda t: "", "test")
    got = np.array([[a[:256] for a in row] for row in parent.extra["scores"].acc])
    spans = parent.extra["partial_spans"]
    logp = np.log(pred)
    dens = ((logp - logp.mean(-1, keepdims=True)) / (logp.std(-1, keepdims=True) + 1e-6)).mean(
        (0, 1))
    # 25% of 256 tokens: the one span of 64 whose mean z-scored prediction is the highest
    assert spans == [64 * int(np.argmax(dens.reshape(4, 64).mean(1)))]
    mask = np.zeros(256, bool)
    mask[spans[0]:spans[0] + 64] = True
    assert not np.allclose(got[..., mask], pred[..., mask]) and (got[..., mask] > 0).all()
    if calib == "none":
        np.testing.assert_array_equal(got[..., ~mask], pred[..., ~mask])
        return
    fit = mask.copy()
    fit[:4] = False
    for layer in range(got.shape[0]):
        for h in range(got.shape[1]):
            out, rep = got[layer, h, ~mask], got[layer, h, fit]
            assert rep.min() - 1e-6 <= out.min() and out.max() <= rep.max() + 1e-6
            order = np.argsort(pred[layer, h, ~mask], kind="stable")
            assert (np.diff(out[order]) >= -1e-6).all()  # the predictions' order kept
    assert not any(s.seq_id != parent.seq_id for s in eng.sequences.values())


def test_partial_replay_columns_share_a_parent_by_their_replay_and_need_the_agnostic_protocol(
        tiny_model, tmp_path):
    import dataclasses

    from kvcrush_ov.eval import runner
    from kvcrush_ov.eviction.kvzap import KVzap

    spec = dataclasses.replace(make_spec(CacheEvictionConfig()), policy=KVzap())
    names = ("kvzap", "kvzap-replay25", "kvzap-replay50", "kvzap-replay50+kvcrush")
    groups = runner.score_groups({(n, b): spec for n in names for b in (0.25, 0.125)})
    assert sorted(sorted({k[0] for k in keys}) for keys in groups.values()) == [
        ["kvzap"], ["kvzap-replay25"], ["kvzap-replay50", "kvzap-replay50+kvcrush"]]
    with pytest.raises(ConfigError, match="query-agnostic") as err:
        runner.run_eval(str(tiny_model), tmp_path, tasks=["vt"], num_samples=1,
                        methods=["kvzap-replay50"], budgets=[0.25], say=lambda _: None)
    assert err.value.field == "methods"
    assert not (tmp_path / "results.jsonl").exists()


def _script(name: str):
    """scripts/<name>.py loaded as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _gpu_script():
    return _script("kvzap_gpu")


def test_the_gpu_script_trains_a_surrogate_the_engine_loads(tiny_model, tmp_path):
    """scripts/kvzap_gpu.py: token ids here, then targets and the residual MLP (here on the
    CPU) through train.py loaded from its file; the result loads and fits the model."""
    script = _gpu_script()
    hf = tiny_model.parent / "hf"
    texts_file, out = tmp_path / "t.npz", tmp_path / "kvzap.npz"
    assert script.main(["texts", "--model", str(hf), "--texts", "5", "--min-tokens", "60",
                        "--max-tokens", "120", "--out", str(texts_file)]) == 0
    assert script.main(["train", "--hf", str(hf), "--texts-file", str(texts_file), "--out",
                        str(out), "--hidden", "8", "--keep", "40", "--test", "3:5",
                        "--device", "cpu", "--epochs", "3", "--batch", "512"]) == 0
    w = KVzapWeights.load(out)  # the defaults: the recipe of docs/chat.md
    assert w.target == "kvzip-step" and w.meta["censor"] is True and w.meta["grid"] == "text"
    other = tmp_path / "text.npz"  # the experiment's step grid, another draw: another fit
    assert script.main(["train", "--hf", str(hf), "--texts-file", str(texts_file), "--out",
                        str(other), "--keep", "40", "--test", "3:5", "--device", "cpu",
                        "--target", "kvzip-step", "--hidden", "0", "--grid", "text",
                        "--seed", "1"]) == 0
    high = tmp_path / "q75.npz"  # a higher floor: other raised targets, another R^2
    assert script.main(["train", "--hf", str(hf), "--texts-file", str(texts_file), "--out",
                        str(high), "--hidden", "8", "--keep", "40", "--test", "3:5",
                        "--device", "cpu", "--target", "kvzip-step", "--censor",
                        "--censor-quantile", "0.75", "--epochs", "3", "--batch", "512"]) == 0
    q75 = KVzapWeights.load(high)
    assert w.meta["censor_quantile"] == 0.5 and q75.meta["censor_quantile"] == 0.75
    assert not np.allclose(q75.meta["r2"], w.meta["r2"])
    lin = KVzapWeights.load(other)
    assert lin.meta["grid"] == "text" and lin.meta["seed"] == 1 and lin.hidden is None
    assert lin.meta["censor"] is False  # no floor without an MLP
    assert not np.allclose(lin.meta["r2"], w.meta["r2_ridge"])
    w.check_model(4, 256, 2)
    assert w.hidden == 8 and w.skip.shape == (4, 256, 2) and w.position is None
    assert w.meta["texts"] == 3 and w.meta["test_texts"] == 2 and w.meta["rows_per_text"] == 40
    assert len(w.meta["r2"]) == 4 and all(np.isfinite(w.meta["r2"] + w.meta["r2_ridge"]))
    joined = tmp_path / "joined.npz"  # trained on long texts: two of the file's texts each
    assert script.main(["train", "--hf", str(hf), "--texts-file", str(texts_file), "--out",
                        str(joined), "--hidden", "0", "--keep", "40", "--test", "1:2",
                        "--device", "cpu", "--join", "2"]) == 0
    j = KVzapWeights.load(joined)
    assert j.meta["join"] == 2 and j.meta["texts"] == 1 and w.meta["join"] == 1
    assert not np.allclose(j.weight, lin.weight)
    dist = tmp_path / "dist.npz"  # the same map, then a distance term on joined texts
    assert script.main(["train", "--hf", str(hf), "--texts-file", str(texts_file), "--out",
                        str(dist), "--hidden", "8", "--keep", "40", "--test", "3:5",
                        "--device", "cpu", "--target", "kvzip-step", "--censor",
                        "--epochs", "3", "--batch", "512", "--position", "2",
                        "--position-join", "2", "--position-texts", "2"]) == 0
    d = KVzapWeights.load(dist)
    assert d.position.shape == (4, 2, 2)
    np.testing.assert_array_equal(d.weight, w.weight)  # the map is untouched ...
    assert not np.allclose(d.bias2, w.bias2)  # ... but for the term's intercept
    info = d.meta["position"]
    assert info["degree"] == 2 and info["join"] == 2 and info["texts"] == 2
    assert info["r2_after"] >= info["r2_before"]  # least squares with an intercept
    onto = tmp_path / "onto.npz"  # the term alone, onto the surrogate trained first
    assert script.main(["position", "--hf", str(hf), "--texts-file", str(texts_file),
                        "--surrogate", str(out), "--out", str(onto), "--degree", "1",
                        "--join", "2", "--texts", "2", "--end", "5", "--keep", "40",
                        "--device", "cpu", "--censor-quantile", "0.5"]) == 0
    o = KVzapWeights.load(onto)
    assert o.position.shape == (4, 1, 2) and o.target == w.target
    np.testing.assert_array_equal(o.skip, w.skip)
    assert o.meta["position"]["surrogate"] == "kvzap.npz" and o.meta["position"]["end"] == 5
    assert o.meta["censor"] is True  # the surrogate's own meta kept


@pytest.mark.parametrize(("args", "field"), [
    (["--test", "3-5"], "--test"), (["--test", "0:5"], "--test"), (["--test", "4:9"], "--test"),
    (["--keep", "0"], "--keep"), (["--hidden", "-1"], "--hidden"),
    (["--texts-file", "missing.npz"], "--texts-file"), (["--censor", "--hidden", "0"], "--censor"),
    (["--target", "kvzip+"], "--target"), (["--epochs", "0"], "--epochs"),
    (["--batch", "0"], "--batch"), (["--lr", "0"], "--lr"),
    (["--target", "kvzip", "--grid", "text"], "--grid"),
    (["--censor", "--censor-quantile", "1"], "--censor-quantile"),
    (["--position", "-1"], "--position"), (["--position", "1", "--position-join", "0"],
                                           "--position-join"),
    (["--position", "1", "--position-texts", "0"], "--position-texts"),
    (["--join", "0"], "--join"), (["--join", "2"], "--test")])
def test_the_gpu_script_names_a_bad_argument_before_loading_the_model(tmp_path, capsys, args,
                                                                        field):
    texts_file = tmp_path / "t.npz"
    np.savez(texts_file, lengths=np.array([3] * 5), ids=np.zeros(15, np.int32))
    argv = ["train", "--hf", str(tmp_path / "no-model"), "--texts-file", str(texts_file),
            "--out", str(tmp_path / "o.npz"), "--test", "3:5", "--device", "cpu", *args]
    with pytest.raises(SystemExit) as err:
        _gpu_script().main(argv)
    assert err.value.code == 2 and field in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize(("args", "field"), [
    (["--surrogate", "missing.npz"], "--surrogate"), (["--degree", "0"], "--degree"),
    (["--end", "9"], "--end"), (["--join", "0"], "--join"),
    (["--censor-quantile", "0"], "--censor-quantile")])
def test_the_gpu_scripts_position_step_names_a_bad_argument(tmp_path, capsys, args, field):
    texts_file, sur = tmp_path / "t.npz", tmp_path / "s.npz"
    np.savez(texts_file, lengths=np.array([3] * 5), ids=np.zeros(15, np.int32))
    save(sur, np.zeros((4, 256, 2), np.float32), np.zeros((4, 2), np.float32), "kvzip", {})
    argv = ["position", "--hf", str(tmp_path / "no-model"), "--texts-file", str(texts_file),
            "--surrogate", str(sur), "--out", str(tmp_path / "o.npz"), "--device", "cpu", *args]
    argv = [a if a != "missing.npz" else str(tmp_path / a) for a in argv]
    with pytest.raises(SystemExit) as err:
        _gpu_script().main(argv)
    assert err.value.code == 2 and field in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()


def _proxy_script():
    return _script("kvzap_proxy")


def test_the_proxy_ranks_query_agnostic_contexts_against_kvzip(tiny_model, tmp_path):
    """scripts/kvzap_proxy.py: RULER contexts as ids with their answers' positions, then each
    ranking's kept rows at a budget against KVzip's (the reference keeps itself: overlap 1)."""
    import json

    import torch

    script = _proxy_script()
    ctx, out = tmp_path / "c.npz", tmp_path / "r.json"
    assert script.main(["contexts", "--model", str(tiny_model.parent / "hf"), "--samples", "2",
                        "--task", "niah_single_1", "--max-seq-length", "1024", "--out",
                        str(ctx)]) == 0
    z = np.load(ctx)
    assert len(z["lengths"]) == 2 and (z["needle_lengths"] > 0).all()
    surrogate = _surrogate(tmp_path, tiny_model, mlp=8, skip=True).parent / "kvzap.npz"
    assert script.main(["score", "--hf", str(tiny_model.parent / "hf"), "--contexts", str(ctx),
                        "--surrogate", f"mine={surrogate}", "--budget", "0.5", "--device",
                        "cpu", "--out", str(out)]) == 0
    records = {r["ranking"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"kvzip", "kvzip-max", "mine"}
    assert records["kvzip"]["overlap"] == 1.0 and records["mine"]["samples"] == 2
    assert all(0 <= r["coverage"] <= 1 and 0 <= r["overlap"] <= 1 for r in records.values())
    scores = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 400, 2)))
    keep = script.keep_mask(scores, 0.25)  # 100 per head, 64 of them sinks and recent rows
    assert keep.shape == (6, 400 - 64) and int(keep.sum()) == 6 * (100 - 64)
    assert keep.sum(1).min() >= int(0.2 * 36)  # every head keeps its own share


@pytest.mark.parametrize(("args", "field"), [
    (["--surrogate", "nopath"], "--surrogate"), (["--surrogate", "kvzip=x.npz"], "--surrogate"),
    (["--budget", "1.5"], "--budget"), (["--contexts", "missing.npz"], "--contexts")])
def test_the_proxy_names_a_bad_argument_before_loading_the_model(tmp_path, capsys, args, field):
    ctx = tmp_path / "c.npz"
    np.savez(ctx, lengths=np.array([3]))
    argv = ["score", "--hf", str(tmp_path / "no-model"), "--contexts", str(ctx), *args]
    with pytest.raises(SystemExit) as err:
        _proxy_script().main(argv)
    assert err.value.code == 2 and field in capsys.readouterr().err


@pytest.mark.parametrize(("args", "field"), [
    (["--samples", "0"], "--samples"), (["--task", "niah_single_9"], "--task"),
    (["--max-seq-length", "0"], "--max-seq-length")])
def test_the_proxy_contexts_step_names_a_bad_argument_before_any_work(tmp_path, capsys, args,
                                                                       field):
    out = tmp_path / "c.npz"
    with pytest.raises(SystemExit) as err:
        _proxy_script().main(["contexts", "--model", "no-such-model", "--out", str(out), *args])
    assert err.value.code == 2 and field in capsys.readouterr().err
    assert not out.exists()


def test_the_gpu_ruler_emulation_answers_as_the_model_and_masks_what_is_evicted(tiny_model,
                                                                                 tmp_path):
    """scripts/kvzap_ruler_gpu.py: the full cache's answers are Hugging Face's greedy ones; a
    budget's rows are masked per (layer, KV head) (a masked key gets no attention); every
    (sample, ranking, budget) is answered and scored by RULER's metric."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    gpu = _script("kvzap_ruler_gpu")
    hf = tiny_model.parent / "hf"
    ctx, out = tmp_path / "c.npz", tmp_path / "a.json"
    assert _proxy_script().main(["contexts", "--model", str(hf), "--samples", "2", "--task",
                                 "niah_single_1", "--max-seq-length", "512", "--out",
                                 str(ctx)]) == 0
    surrogate = _surrogate(tmp_path, tiny_model, mlp=8, skip=True).parent / "kvzap.npz"
    assert gpu.main(["answer", "--hf", str(hf), "--contexts", str(ctx), "--surrogate",
                     f"mine={surrogate}", "--budget", "0.25", "--kvzip", "--device", "cpu",
                     "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    assert sorted((r["ranking"], r["budget"]) for r in records) == sorted(
        [("full", 1.0), ("kvzip", 0.25), ("mine", 0.25)] * 2)
    z = np.load(ctx)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    n, a = int(z["lengths"][0]), int(z["ask_lengths"][0])
    ids = z["ids"][:n].tolist() + z["asks"][:a].tolist()
    meta = json.loads(str(z["meta"]))["samples"][0]
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=meta["max_new_tokens"],
                             do_sample=False, attention_mask=torch.ones(1, len(ids)))
    full = next(r for r in records if r["ranking"] == "full" and r["index"] == meta["index"])
    assert ref[0, len(ids):len(ids) + len(full["ids"])].tolist() == full["ids"]
    # the attention itself: all kept = eager attention; a masked key gets no weight
    q, k, v = (torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8))
    layer = type("L", (), {"layer_idx": 0})()
    keep = torch.ones(2, 2, 4, dtype=torch.bool)
    keep[1, 0, 2] = False
    gpu.KEEP[0] = keep
    try:
        _, p = gpu.masked_attention(layer, q, k, v, None, scaling=0.5)
    finally:
        gpu.KEEP.clear()
    gpu.WEIGHTS["need"] = True
    try:
        o0, p0 = gpu.masked_attention(layer, q, k, v, None, scaling=0.5)
    finally:
        gpu.WEIGHTS["need"] = False
    fused, none = gpu.masked_attention(layer, q[:, :, :6], k, v, None, scaling=0.5)
    assert none is None
    torch.testing.assert_close(fused, o0, rtol=1e-4, atol=1e-5)  # the fused path: the same
    assert (p[1, :2, :, 2] == 0).all() and (p[1, :2, 3:, :2] > 0).all()
    torch.testing.assert_close(p[0], p0[0])
    assert (p0[:, :, 0, 1:] == 0).all()  # causal
    text = gpu.table(records, str(hf))
    assert "| full | 1.0 |" in text and "| mine | 0.25 |" in text


@pytest.mark.parametrize(("args", "field"), [
    (["--surrogate", "full=x.npz"], "--surrogate"), (["--budget", "0"], "--budget"),
    (["--contexts", "missing.npz"], "--contexts"), ([], "--contexts")])
def test_the_gpu_ruler_emulation_names_a_bad_argument_before_loading_the_model(tmp_path, capsys,
                                                                                args, field):
    ctx = tmp_path / "c.npz"
    np.savez(ctx, lengths=np.array([3]))  # no questions: written by an older contexts step
    argv = ["answer", "--hf", str(tmp_path / "no-model"), "--contexts", str(ctx),
            "--out", str(tmp_path / "a.json"), *args]
    with pytest.raises(SystemExit) as err:
        _script("kvzap_ruler_gpu").main(argv)
    assert err.value.code == 2 and field in capsys.readouterr().err


def test_a_question_window_max_combines_the_prompts_last_queries_with_the_predictions(
        tiny_model, tmp_path):
    """KVzap(question_window=N): the steps that compute the prompt's last N tokens score their
    queries, and every earlier row keeps the larger of its prediction and that attention (the
    predictions made tiny here, so the attention shows); the last step's own rows keep their
    predictions. N = 1 scores no query."""
    import dataclasses

    from kvcrush_ov.eviction.kvzap import KVzap

    model_dir = _surrogate(tmp_path, tiny_model)
    path = model_dir.parent / "kvzap.npz"
    z = dict(np.load(path))
    z["bias"] = z["bias"] - 8.0
    np.savez(path, **z)
    ids = np.random.default_rng(3).integers(11, 500, 200).tolist()  # steps of 64, 64, 64, 8
    runs = {}
    for n in (1, 12):
        eng = _engine(model_dir, _cfg())
        caught = _watch(eng)
        scored: list = []
        windows = eng.evictor.windows
        eng.evictor.windows = lambda chunks, w=windows, s=scored: s.append(w(chunks)) or s[-1]
        seq = eng.add_request(ids, GenerationConfig(max_new_tokens=2), set(), lambda t: "")
        eng.set_spec(seq, dataclasses.replace(eng.evictor.spec, policy=KVzap(question_window=n)))
        while eng.has_unfinished():
            eng.step()
        assert len(caught) == 1
        runs[n] = (caught[0], scored)
    assert all(w is None for w in runs[1][1])
    assert runs[12][1][:4] == [None, None, [4], [8]]  # the window's 12 queries: 4 + 8
    for one, twelve in zip(runs[1][0], runs[12][0], strict=True):
        for a, b in zip(one, twelve, strict=True):
            assert len(a) == len(b) == 200
            assert (b[:192] >= a[:192]).all() and (b[:192] > 10 * a[:192]).mean() > 0.9
            np.testing.assert_allclose(b[192:], a[192:], rtol=1e-5)


def test_early_replay_columns_rank_their_first_layers_by_the_replay(tiny_model, tmp_path,
                                                                     monkeypatch):
    """The eval's layer candidates (runner.LAYER_REPLAY): one parent predicts and replays for
    all of them; a column ranking every layer by the replay keeps what KVzip keeps, one
    ranking only the first layer keeps something else; they need the agnostic protocol."""
    import dataclasses
    import json

    from kvcrush_ov.eval import runner
    from kvcrush_ov.eviction.kvzap import KVzap

    spec = dataclasses.replace(make_spec(CacheEvictionConfig()), policy=KVzap())
    groups = runner.score_groups({(n, 0.125): spec
                                  for n in ("kvzap", "kvzap-early25", "kvzap-late50")})
    assert sorted(sorted(k[0] for k in keys) for keys in groups.values()) == [
        ["kvzap"], ["kvzap-early25", "kvzap-late50"]]
    layers = {n: runner.replay_layers(s, 24) for n, s in runner.LAYER_REPLAY.items()}
    assert layers == {"kvzap-early25": range(6), "kvzap-early33": range(8),
                      "kvzap-early50": range(12), "kvzap-late25": range(18, 24),
                      "kvzap-late50": range(12, 24)}
    assert runner.replay_layers((0.0, 0.01), 4) == range(1)
    assert runner.replay_layers((0.99, 1.0), 4) == range(3, 4)
    model_dir = _surrogate(tmp_path, tiny_model)
    with pytest.raises(ConfigError, match="query-agnostic") as err:
        runner.run_eval(str(model_dir), tmp_path / "x", tasks=["vt"], num_samples=1,
                        methods=["kvzap-early25"], budgets=[0.25], say=lambda _: None)
    assert err.value.field == "methods"
    monkeypatch.setitem(runner.LAYER_REPLAY, "kvzap-early50", (0.0, 1.0))  # every layer
    out = tmp_path / "run"
    runner.run_eval(str(model_dir), out, tasks=["vt"], num_samples=2,
                    methods=["kvzip-recent32", "kvzap", "kvzap-early25", "kvzap-early50"],
                    budgets=[0.125], max_seq_length=1024, max_num_batched_tokens=128,
                    protocol="query-agnostic", say=lambda _: None)
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    by = {}
    for r in recs:
        by.setdefault(r["method"], []).append((r["index"], r["prediction"], r["kv_bytes"]))
    assert sorted(by["kvzap-early50"]) == sorted(by["kvzip-recent32"])
    assert sorted(by["kvzap-early25"]) != sorted(by["kvzip-recent32"])
    assert sorted(by["kvzap-early25"]) != sorted(by["kvzap"])
