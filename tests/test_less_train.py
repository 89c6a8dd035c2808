"""LESS training (kvcrush_ov/less/train.py, ``kvcrush-ov less-train``): the torch feature maps
against the numpy reference, the q/k/v capture against the model's own attention, the simulated
eviction against the engine's default SnapKV written out by hand, the spill's clean-up,
training / resuming on tiny-random-llama, and the CLI's argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from kvcrush_ov.errors import ConfigError
from kvcrush_ov.less.kernels import ARRAYS, LESSWeights, mixed_attention

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from kvcrush_ov.less import train as lt  # noqa: E402  (needs torch only inside its functions)

torch.set_num_threads(2)


def _random_weights(seed: int = 1) -> LESSWeights:
    w = LESSWeights.initial(num_layers=2, num_heads=6, num_kv_heads=2, head_dim=16, hidden=12,
                            feature_dim=5, seed=seed)
    rng = np.random.default_rng(seed)
    for name in ("k_s1", "k_s2", "q_b2", "k_b2"):  # away from the near-zero initial scales
        w.arrays[name] = rng.normal(0, 1, w.arrays[name].shape).astype(np.float32)
    return w


def _layer(w: LESSWeights, layer: int) -> dict:
    return {n: torch.from_numpy(w.arrays[n][layer].copy()) for n in ARRAYS}


def test_torch_feature_maps_equal_numpy():
    w = _random_weights()
    rng = np.random.default_rng(2)
    for layer in range(2):
        p = _layer(w, layer)
        q = rng.normal(0, 2, (7, 6, 16)).astype(np.float32)  # [n, Hq, D]
        got = lt.phi(p, torch.from_numpy(q).transpose(0, 1)).transpose(0, 1).numpy()
        want = w.phi(layer, q)
        assert want.shape == got.shape == (7, 6, 5) and want.max() > 0.1
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        k = rng.normal(0, 2, (2, 9, 16)).astype(np.float32)  # [Hkv, n, D]
        got = lt.psi(p, torch.from_numpy(k)).numpy()
        for h in range(2):
            want = w.psi(layer, h, k[h])
            assert want.max() > 0.1
            np.testing.assert_allclose(got[h], want, atol=1e-5, rtol=1e-5)


def test_less_attention_equals_reference():
    rng = np.random.default_rng(3)
    hq, hkv, d, f, n = 6, 2, 8, 4, 11
    q = rng.normal(0, 1, (hq, d))
    keys = rng.normal(0, 1, (hkv, n, d))
    values = rng.normal(0, 1, (hkv, n, d))
    phi_q = rng.uniform(0, 1, (hq, f))
    H = rng.normal(0, 1, (hkv, f, d))
    z = rng.uniform(0.5, 2, (hkv, f))
    scale = d ** -0.5
    s = torch.tensor(scale * np.einsum("hd,hnd->hn", q, keys.repeat(3, axis=0)))
    o_kept = torch.softmax(s, -1)[:, None, :] @ torch.tensor(values.repeat(3, axis=0))
    lse = torch.logsumexp(s, -1)[:, None]
    t = {k: torch.tensor(v) for k, v in dict(p=phi_q[:, None, :], H=H, z=z).items()}
    got = lt.less_attention(o_kept, lse, t["p"], t["H"], t["z"])[:, 0].numpy()
    for h in range(hq):
        g = h // 3
        want = mixed_attention(q[h], keys[g], values[g], scale, phi_q[h], H[g], z[g])
        np.testing.assert_allclose(got[h], want, rtol=1e-9, atol=1e-9)
    for shift in (0.0, -80.0):  # Z = 0: exactly no-op, also where every kept logit is tiny
        empty = lt.less_attention(o_kept, lse + shift, t["p"], t["H"] * 0, t["z"] * 0)
        torch.testing.assert_close(empty, o_kept, rtol=0, atol=0)
    # tiny kept logits (e^lse ~ e^-80): the state's own average N / Z, as the reference gives
    got = lt.less_attention(o_kept, lse - 80.0, t["p"], t["H"], t["z"])[:, 0].numpy()
    np.testing.assert_allclose(got, np.einsum("hf,hfd->hd", phi_q, H.repeat(3, axis=0))
                               / np.einsum("hf,hf->h", phi_q, z.repeat(3, axis=0))[:, None],
                               rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module")
def tiny_hf(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model.parent / "hf"),
                                                 dtype=torch.float32).eval()
    return model


def test_capture_reproduces_the_attention_module(tiny_hf):
    mods = lt.attention_modules(tiny_hf)
    outs = {}
    handles = [m.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o[0][0]))
               for i, m in enumerate(mods)]
    ids = torch.randint(0, tiny_hf.config.vocab_size, (1, 57), generator=torch.Generator()
                        .manual_seed(0))
    try:
        got = lt.capture_qkv(tiny_hf, ids)
    finally:
        for h in handles:
            h.remove()
    assert sorted(got) == list(range(len(mods))) == sorted(outs)
    for i, (q, k, v) in got.items():
        hq, n, d = q.shape
        g = hq // k.shape[0]
        s = (q @ k.repeat_interleave(g, 0).transpose(1, 2)) * d ** -0.5
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        o = torch.softmax(s, -1) @ v.repeat_interleave(g, 0)  # [Hq, n, D]
        with torch.no_grad():
            ref = mods[i].o_proj(o.transpose(0, 1).reshape(n, hq * d))
        assert (ref - outs[i]).abs().max() < 1e-4, i
        assert outs[i].abs().max() > 1e-3  # not trivially zero


def _reference_evicted(q, k, p: int, budget: float, scale: float) -> list[list[int]]:
    """The engine's default SnapKV eviction of the prompt [0, p), written out independently of
    kvcrush_ov.eviction: the last 32 queries' attention summed over them and the group's query
    heads, / 32 (norm_sum), avg-pooled over 31 centred and clipped to the candidates (the keys
    neither among the 32 sinks nor the 128 recent), the top int(budget * p) - 160 candidates
    (ties: the earlier) kept. Per KV head: the evicted positions, ascending."""
    from kvcrush_ov.config import NATIVE_KERNEL_SIZE, CacheEvictionConfig

    cfg = CacheEvictionConfig()
    sinks, recent, window = cfg.start_size, cfg.recent_tokens(), cfg.snapkv_window_size
    assert (sinks, recent, window, NATIVE_KERNEL_SIZE) == (32, 128, 32, 31)
    assert cfg.pooling is None and cfg.pooling_offset == 0 and cfg.aggregation_mode == "norm_sum"
    hq, hkv = q.shape[0], k.shape[0]
    g = hq // hkv
    acc = np.zeros((hkv, p))
    for h in range(hq):
        for t in range(p - window, p):
            acc[h // g, :t + 1] += torch.softmax((q[h, t] @ k[h // g, :t + 1].T) * scale,
                                                 -1).double().numpy()
    cand = np.arange(sinks, p - recent)
    c, r = len(cand), NATIVE_KERNEL_SIZE // 2
    num_keep = max(int(budget * p), sinks + recent) - sinks - recent
    out = []
    for h in range(hkv):
        sc = acc[h, cand] / window
        pooled = np.array([sc[max(0, j - r):min(c, j + r + 1)].mean() for j in range(c)])
        top = np.argsort(-pooled, kind="stable")[:num_keep]
        out.append(sorted(set(cand.tolist()) - set(cand[top].tolist())))
    return out


def test_simulated_eviction_is_the_engines(tiny_hf):
    """The evicted set equals the engine's default SnapKV written out by hand (32 sinks, 128
    recent, 32-query window, avg over 31, total budget); the meta constants come from it."""
    from kvcrush_ov.config import NATIVE_KERNEL_SIZE, CacheEvictionConfig

    cfg = CacheEvictionConfig()
    got = (lt.SINKS, lt.RECENT, lt.WINDOW, lt.KERNEL_SIZE, lt.POOLING, lt.POOLING_OFFSET,
           lt.AGGREGATION)
    assert got == (cfg.start_size, cfg.recent_tokens(), cfg.snapkv_window_size, NATIVE_KERNEL_SIZE,
                   "avg", 0, cfg.aggregation_mode)
    ids = torch.randint(0, tiny_hf.config.vocab_size, (1, 500), generator=torch.Generator()
                        .manual_seed(1))
    q, k, _ = lt.capture_qkv(tiny_hf, ids, [1])[1]
    scale = float(lt.attention_modules(tiny_hf)[1].scaling)
    for p, budget in ((430, 0.6), (400, 0.45), (331, 0.125)):
        spec = lt.engine_spec(budget)
        ev = lt.snapkv_evicted(q, k, p, spec, scale)
        assert ev.dtype == torch.int64
        want = _reference_evicted(q, k, p, budget, scale)
        assert ev.tolist() == want, (p, budget)
        # the total budget: sinks and recent window count in it
        assert ev.shape == (k.shape[0], p - max(int(budget * p), 160))
    # selection matters in the first cases: the heads keep different tokens
    assert lt.snapkv_evicted(q, k, 430, lt.engine_spec(0.6), scale).unique(dim=0).shape[0] > 1
    assert lt.snapkv_evicted(q, k, 150, lt.engine_spec(0.125), scale).shape == (2, 0)


def test_example_targets(tiny_hf):
    """The kept-part output / log-sum-exp and the target equal a direct computation; the
    evicted keys / values are spilled as float16."""
    ids = torch.randint(0, tiny_hf.config.vocab_size, (1, 400), generator=torch.Generator()
                        .manual_seed(2))
    q, k, v = lt.capture_qkv(tiny_hf, ids, [1])[1]
    mod = lt.attention_modules(tiny_hf)[1]
    hq, _, d = q.shape
    g = hq // k.shape[0]
    p, spec = 330, lt.engine_spec(0.5)
    ev = lt.snapkv_evicted(q, k, p, spec, float(mod.scaling))
    assert ev.shape == (2, p - 165)
    ex = lt._example(mod, q, k, v, p, spec)
    assert ex["ek"].dtype == ex["ev"].dtype == torch.float16
    n = p + lt.QUERIES
    outs = []
    for h in range(hq):
        gone = set(ev[h // g].tolist())
        for j, t in enumerate(range(p, n)):
            s = (k[h // g, :t + 1] @ q[h, t]).double() * mod.scaling
            kept = torch.tensor([i not in gone for i in range(t + 1)])
            torch.testing.assert_close(ex["lse"][h, j], torch.logsumexp(s[kept], 0).float())
            torch.testing.assert_close(ex["o_kept"][h, j], (torch.softmax(s[kept], 0).float()
                                                            @ v[h // g, :t + 1][kept]))
            outs.append(torch.softmax(s, 0).float() @ v[h // g, :t + 1])
    full = torch.stack(outs).view(hq, lt.QUERIES, d).transpose(0, 1).reshape(lt.QUERIES, -1)
    with torch.no_grad():
        torch.testing.assert_close(ex["target"], mod.o_proj(full), atol=1e-5, rtol=1e-4)
    for h in range(2):
        torch.testing.assert_close(ex["ek"][h].float(), k[h, ev[h]], atol=1e-2, rtol=1e-3)
        torch.testing.assert_close(ex["ev"][h].float(), v[h, ev[h]], atol=1e-2, rtol=1e-3)
    big = torch.full((2, 3, 4), 1e5)  # beyond float16: kept as float32
    assert lt._spill(big).dtype == torch.float32 and lt._spill(big / 1e3).dtype == torch.float16


def test_stale_spill_folders_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(gone.stdout)
    (tmp_path / f".collect-{dead}-abc").mkdir()
    (tmp_path / f".collect-{dead}-abc" / "layer000-00000.pt").write_bytes(b"x")
    (tmp_path / f".collect-{os.getpid()}-def").mkdir()  # this process: alive, stays
    (tmp_path / "other").mkdir()
    lt._remove_stale_spills(tmp_path)
    assert sorted(d.name for d in tmp_path.iterdir()) == sorted(
        [f".collect-{os.getpid()}-def", "other"])


def _cfg(out, **kw) -> lt.TrainConfig:
    base = dict(model="tiny-random-llama", seq_len=512, sequences=8, steps=40, hidden=16,
                features=4, out=out)
    return lt.TrainConfig(**{**base, **kw})


def _spills() -> list:
    import os

    from kvcrush_ov.models import store

    return list((store.home() / "tmp").glob(f".collect-{os.getpid()}-*"))


def test_train_resume_and_refuse(tiny_model, tmp_path):
    out = tmp_path / "less.npz"
    r1 = lt.train(_cfg(out, layers=2))
    assert _spills() == []  # the spill folder is gone
    assert [r.layer for r in r1.layers] == [0, 1] and r1.path == out
    for r in r1.layers:  # training beat the initial (no-op) kernels on held-out data
        assert r.val_loss < 0.999 * r.val_loss_initial, r
        assert r.val_loss < r.val_loss_noless and r.gap_recovered > 0
    w1 = LESSWeights.load(out)
    assert w1.meta["layers_trained"] == 2 and w1.meta["hidden"] == 16
    assert w1.meta["model"] == "tiny-random-llama" and len(w1.meta["data_hash"]) == 64
    assert (w1.meta["simulation"], w1.meta["sinks"], w1.meta["recent"], w1.meta["window"],
            w1.meta["kernel_size"], w1.meta["pooling"]) == (lt.SIMULATION, 32, 128, 32, 31, "avg")
    assert w1.meta["prefix_range"] == [256, 512 - lt.QUERIES]
    assert len(w1.meta["seconds_per_layer"]) == 2
    init = LESSWeights.initial(4, 8, 2, 32, hidden=16, feature_dim=4, seed=0)
    assert not np.array_equal(w1.arrays["k_s1"][:2], init.arrays["k_s1"][:2])
    np.testing.assert_array_equal(w1.arrays["k_s1"][2:], init.arrays["k_s1"][2:])

    r2 = lt.train(_cfg(out))  # resumes: layers 2 and 3 only
    assert [r.layer for r in r2.layers] == [2, 3]
    w2 = LESSWeights.load(out)
    assert w2.meta["layers_trained"] == 4 and len(w2.meta["val_loss"]) == 4
    assert w2.meta["seconds_per_layer"][:2] == w1.meta["seconds_per_layer"]
    for name in ARRAYS:
        np.testing.assert_array_equal(w2.arrays[name][:2], w1.arrays[name][:2])
    assert lt.train(_cfg(out)).layers == []  # all done: nothing retrained

    with pytest.raises(ConfigError, match="hidden") as e:
        lt.train(_cfg(out, hidden=8))
    assert e.value.field == "--hidden"
    with pytest.raises(ConfigError) as e:
        lt.train(_cfg(out, sequences=9))
    assert e.value.field == "--sequences"
    # a file trained with another simulation (an older version: no field) never resumes
    meta = dict(w2.meta, layers_trained=2)
    for old in ({"simulation": 1}, {"simulation": None}, {"recent": 8}):
        w = LESSWeights(w2.arrays, dict(meta, **old))
        if old.get("simulation", 0) is None:
            del w.meta["simulation"]
        w.save(out)
        with pytest.raises(ConfigError) as e:
            lt.train(_cfg(out))
        assert e.value.field == next(iter(old))
    assert _spills() == []
    r3 = lt.train(_cfg(out, hidden=8, layers=1, steps=2, restart=True))
    assert [r.layer for r in r3.layers] == [0]
    assert LESSWeights.load(out).meta["hidden"] == 8


@pytest.mark.parametrize("extra, field", [
    (["--budget", "1.5"], "--budget"),
    (["--budget", "0"], "--budget"),
    (["--budget", "100"], "--budget"),  # a token count, not a fraction
    (["--budget", "lots"], "--budget"),
    (["--seq-len", "64"], "--seq-len"),
    (["--seq-len", str(lt.MIN_SEQ_LEN - 1)], "--seq-len"),  # no more than sinks + recent
    (["--seq-len", "100000"], "--seq-len"),  # beyond the model's context
    (["--sequences", "0"], "--sequences"),
    (["--steps", "0"], "--steps"),
    (["--hidden", "0"], "--hidden"),
    (["--features", "-1"], "--features"),
    (["--policy", "h2o"], "--policy"),
    (["--seed", "-1"], "--seed"),
    (["--layers", "0"], "--layers"),
    (["--model", "no-such-model"], "--model"),
    (["--finetune", "0"], "--finetune"),
    (["--finetune", "5", "--finetune-layers", "0"], "--finetune-layers"),
    (["--finetune", "5", "--finetune-retrieval", "1.5"], "--finetune-retrieval"),
    (["--finetune", "5", "--finetune-budget", "2"], "--finetune-budget"),
    (["--finetune", "5", "--finetune-sequences", "0"], "--finetune-sequences"),
])
def test_cli_rejects_bad_arguments(tiny_model, tmp_path, extra, field):
    from kvcrush_ov.cli import build_parser

    args = build_parser().parse_args(["less-train", "--model", "tiny-random-llama",
                                      "--out", str(tmp_path / "w.npz"), *extra])
    with pytest.raises(ConfigError) as e:
        args.func(args)
    assert e.value.field == field
    assert not (tmp_path / "w.npz").exists()


def test_cli_reports_the_error(tmp_path, capsys):
    from kvcrush_ov.cli import main

    assert main(["less-train", "--model", "tiny-random-llama", "--hidden", "0",
                 "--out", str(tmp_path / "w.npz")]) == 2
    assert "--hidden=0 is invalid" in capsys.readouterr().err


def test_a_layer_that_cannot_gain_gets_its_state_switched_off():
    """Targets that the kept tokens alone explain exactly: no kernels beat ignoring the state,
    so the layer gets k_s1 = 0 (an exact no-op) and the initial weights are not kept."""
    g = torch.Generator().manual_seed(0)
    w = LESSWeights.initial(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, hidden=8,
                            feature_dim=4)
    w.arrays["k_s1"][:] = 0.5
    o_proj = torch.nn.Linear(32, 16).requires_grad_(False)

    def split(s: int) -> dict:
        def r(*shape):
            return torch.randn(*shape, generator=g)

        b = {"q": r(s, 4, 5, 8), "o_kept": r(s, 4, 5, 8),
             "lse": r(s, 4, 5) - 60,  # tiny kept logits: a clamped Z would not be a no-op
             "ek": r(s, 2, 7, 8), "ev": r(s, 2, 7, 8), "em": torch.ones(s, 1, 7, 1)}
        with torch.no_grad():
            b["target"] = lt.layer_output({}, b, o_proj, use_less=False)
        return b

    r = lt.train_layer(w, 0, split(6), split(3), o_proj, steps=5, lr=1e-3, batch=2, seed=0)
    assert r.off and r.val_loss == 0.0 == r.val_loss_noless and r.val_loss_initial > 0
    assert (w.arrays["k_s1"][0] == 0).all()
    assert (w.psi(0, 1, np.random.default_rng(0).normal(size=(3, 8))) == 0).all()


# ------------------------------------------------------------------------- end-to-end stage
def test_finetune_suffix_pass_is_the_model_when_nothing_is_evicted(tiny_hf):
    """The stage's own attention: with a prompt the eviction keeps whole (<= sinks + recent),
    the positions after it give the full model's distributions (KL ~ 0) with and without the
    (empty) state; with eviction, a state of switched-off kernels (s1 = 0) changes nothing
    and the kept part alone differs from the full model."""
    from kvcrush_ov.less import finetune as ft

    attn = ft._Attention()
    ft._register(attn)
    tiny_hf.set_attn_implementation(ft.ATTN)
    try:
        w = LESSWeights.initial(num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32,
                                hidden=16, feature_dim=4, seed=3)
        w.arrays["k_s1"][:] = 1.0
        attn.params = [{n: torch.from_numpy(w.arrays[n][i].copy()) for n in ARRAYS}
                       for i in range(w.num_layers)]
        rng = np.random.default_rng(0)
        ids = rng.integers(0, tiny_hf.config.vocab_size, 100 + 40)
        ex = ft.capture(tiny_hf, attn, ids, 100, 0.125)
        assert all(e[0].shape[1] == 0 for e in ex.evicted)
        assert ft._mean_kl(tiny_hf, attn, [ex], "kept") < 1e-6
        assert ft._mean_kl(tiny_hf, attn, [ex], "less") < 1e-6
        ids = rng.integers(0, tiny_hf.config.vocab_size, 400 + 30)
        ex = ft.capture(tiny_hf, attn, ids, 400, 0.125)
        assert all(k.shape[1] == max(50, 160) for k, _ in ex.kept)  # the engine's budget
        kept = ft._mean_kl(tiny_hf, attn, [ex], "kept")
        assert kept > 1e-5
        for d in attn.params:
            d["k_s1"] = torch.zeros_like(d["k_s1"])
        assert ft._mean_kl(tiny_hf, attn, [ex], "less") == kept
    finally:
        tiny_hf.set_attn_implementation("eager")


def test_finetune_tunes_keeps_the_best_and_prunes_layers(tiny_model, tmp_path):
    from kvcrush_ov.less import finetune as ft

    out = tmp_path / "less.npz"
    cfg = dict(model="tiny-random-llama", seq_len=512, sequences=4, steps=3, weights=out)
    with pytest.raises(ConfigError) as e:  # no per-layer weights yet
        ft.finetune(ft.FinetuneConfig(**cfg))
    assert e.value.field == "--out"
    lt.train(_cfg(out, sequences=4, steps=5))
    before = LESSWeights.load(out)
    assert len(before.active_layers) > 2
    r = ft.finetune(ft.FinetuneConfig(**cfg, max_layers=2, eval_every=1))
    w = LESSWeights.load(out)
    meta = w.meta["finetune"]
    assert len(w.active_layers) == 2 and meta["active_layers"] == w.active_layers
    assert r.relative_after <= r.relative_before and meta["relative_after"] == r.relative_after
    assert set(r.kl_noless) == set(r.kl_after) == {"continue", "retrieve"}
    assert meta["retrieval"] == 0.5 and len(meta["data_hash"]) == 64
    assert w.meta["layers_trained"] == 4  # the per-layer record stays


@pytest.mark.parametrize("kw, field", [
    ({"steps": 0}, "--finetune"), ({"budgets": (1.5,)}, "--budget"), ({"budgets": ()}, "--budget"),
    ({"retrieval": 2.0}, "--finetune-retrieval"), ({"max_layers": 0}, "--finetune-layers"),
    ({"sequences": 0}, "--finetune-sequences"),
])
def test_finetune_rejects_bad_configs(kw, field):
    from kvcrush_ov.less.finetune import FinetuneConfig

    with pytest.raises(ConfigError) as e:
        FinetuneConfig(model="tiny-random-llama", **kw).check()
    assert e.value.field == field


def test_retrieval_examples_refuse_text_without_sentences(tiny_model, monkeypatch):
    """Text with no sentence to ask about ends with a named error, not an endless search."""
    from transformers import AutoTokenizer

    from kvcrush_ov.less import finetune as ft

    docs = {s: tuple(f"word{i} " * 300 for i in range(8)) for s in lt.SOURCES}
    monkeypatch.setattr(lt, "documents", lambda: docs)
    monkeypatch.setattr(lt, "_is_val", lambda text: False)
    tok = AutoTokenizer.from_pretrained(str(tiny_model.parent / "hf"))
    with pytest.raises(ConfigError) as e:
        ft.retrieval_examples(tok, 2, 512, 0, False)
    assert e.value.field == "--finetune-retrieval"
