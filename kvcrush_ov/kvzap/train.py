"""Train KVzap's surrogate: KVzip's replay scores predicted from a layer's input, per KV head.

KVzap (Jegou et al., 2026, arXiv 2601.07891) fits, per decoder layer ``l``, a linear map from
the normalised hidden state a token enters the attention with (``x_l``, the input of
``k_proj``) to the log of the importance KVzip's replay gives that token's key in each KV head.
At run time the map costs one [D, Hkv] matrix product per layer and token: no replay.

Collection (torch, eager attention, on CPU): a text of ``tokens`` tokens is followed by
KVzip's repeat prompt and the text again (teacher-forced, as engine/replay.py replays it); for
each layer the attention weights ``A[h, t, i]`` of the replay's queries ``t`` on the text's keys
``i`` give the target, per KV head ``k`` (its query group ``G``):

- ``"kvzip"``: ``log max_{t, h in G} A[h, t, i]`` (KVzip's own score);
- ``"kvzip+"``: ``log max_{t, h in G} A[h, t, i] * |W_o,h v_i| / |x_t|`` (KVzap's target:
  the attention weighted by what the value adds to the output, per unit of the query's input).
- ``"kvzip-step"``: ``log max_s sum_{t in s, h in G} A[h, t, i]`` over aligned steps ``s`` of
  :data:`STEP` replay queries (from the repeat prompt's first token): the score the engine's
  KVzip ranks by (eviction/kvzip.py replays in steps of that many queries, each step's scores
  summed over its queries and the KV head's query group).

Fit: ridge regression per layer with a bias, from the normal equations accumulated over the
texts (no feature matrix is kept), ``lam`` times the mean diagonal as the ridge. With
``hidden``: a residual MLP per layer (:func:`fit_mlp`: the ridge map plus a one-hidden-layer
GELU MLP trained from zero on every row of the training texts, stopped on held-back texts;
``censor``: each text's targets below a quantile (``censor_quantile``, the median by default) of
them over all layers and heads are raised to it, so the fit spends nothing on the order of
tokens no budget keeps).

Output (:func:`save`): ``kvzap.npz`` with ``weight`` f32 [L, D, Hkv], ``bias`` f32 [L, Hkv]
(an MLP: ``weight`` [L, D, Y], ``bias`` [L, Y], ``weight2`` [L, Y, Hkv], ``bias2`` [L, Hkv],
``skip`` [L, D, Hkv]), ``target`` (str), ``meta`` (json: texts, tokens, r2 on held-out texts
per layer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# (nothing from kvcrush_ov at module level: scripts/kvzap_gpu.py loads this file on a GPU
# machine without OpenVINO)

TARGETS = ("kvzip", "kvzip+", "kvzip-step")

#: replay queries per step of the "kvzip-step" target (eviction/kvzip.py's REPLAY_CHUNK; not
#: imported: see above)
STEP = 16


@dataclass
class Normal:
    """Normal equations of one layer: ``xx`` [D+1, D+1], ``xy`` [D+1, Hkv] (bias column last)."""

    xx: np.ndarray
    xy: np.ndarray
    n: int = 0

    @staticmethod
    def gram(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows with the bias column [N, D+1], their Gram matrix [D+1, D+1]): what
        :meth:`add` needs of ``x``, computed once for several targets of the same rows."""
        xb = np.concatenate([x, np.ones((len(x), 1))], axis=1)
        return xb, xb.T @ xb

    def add(self, x: np.ndarray, y: np.ndarray,
            gram: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        xb, xx = Normal.gram(x) if gram is None else gram
        self.xx += xx
        self.xy += xb.T @ y
        self.n += len(x)

    def solve(self, lam: float) -> tuple[np.ndarray, np.ndarray]:
        d = self.xx.shape[0] - 1
        reg = lam * float(np.mean(np.diag(self.xx)[:d]))
        a = self.xx + np.diag(np.r_[np.full(d, reg), 0.0])
        w = np.linalg.solve(a, self.xy)
        return w[:d], w[d]


def normal_of(x, y) -> Normal:
    """The normal equations of torch rows ``x`` [N, D] and targets ``y`` [N, Hkv], summed in
    float64 on their device (a GPU's when there), returned as a :class:`Normal`."""
    import torch

    xb = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64, device=x.device)], 1)
    return Normal((xb.T @ xb).cpu().numpy(), (xb.T @ y.double()).cpu().numpy(), len(x))


_FACT_FRAMES = ("Note: the {key} reference is {value}.", "Record for {key}: {value}.",
                "The {key} entry reads {value}.", "({key}: {value})",
                "Remember that {key} maps to {value}.")


def _fact(rng: np.random.Generator, words: list[str]) -> str:
    """A sentence holding one arbitrary value (a number, a hex string or two rare words):
    text a reader could only reproduce by copying it."""
    key = " ".join(words[int(i)] for i in rng.integers(len(words), size=int(rng.integers(1, 3))))
    kind = int(rng.integers(3))
    if kind == 0:
        value = str(int(rng.integers(10 ** 4, 10 ** 8)))
    elif kind == 1:
        value = "-".join("".join(f"{int(x):x}" for x in rng.integers(16, size=n))
                         for n in (8, 4, 4))
    else:
        value = " ".join(words[int(i)] for i in rng.integers(len(words), size=2))
    return _FACT_FRAMES[int(rng.integers(len(_FACT_FRAMES)))].format(key=key, value=value)


def texts(num: int, tokens_of, min_tokens: int, max_tokens: int, seed: int,
          facts_per_doc: float = 0.0) -> list[str]:
    """``num`` texts of HotpotQA's Wikipedia paragraphs (RULER's qa data, not the niah
    haystack), each joined from random paragraphs up to a random length in
    ``[min_tokens, max_tokens]`` (``tokens_of(text)`` counts); after each paragraph, with
    probability ``facts_per_doc``, a sentence holding an arbitrary value (:func:`_fact`)."""
    from kvcrush_ov.eval.ruler_data import hotpotqa

    docs = hotpotqa()[1]
    rng = np.random.default_rng(seed)
    words = sorted({w.strip(".,;:()\"'").lower() for d in docs[:2000] for w in d.split()
                    if w.isalpha() and len(w) > 6})
    out = []
    for _ in range(num):
        goal = int(rng.integers(min_tokens, max_tokens + 1))
        parts: list[str] = []
        have = 0
        while have < goal:
            doc = docs[int(rng.integers(len(docs)))]
            if facts_per_doc > 0 and rng.random() < facts_per_doc:  # (no draw without facts)
                doc = doc + " " + _fact(rng, words)
            parts.append(doc)
            have += tokens_of(doc)
        out.append("\n\n".join(parts))
    return out


def kvzip_target(attn, spans: tuple[int, int, int, int], num_kv_heads: int):
    """KVzip's score of each text row per KV head, as a log: ``attn`` [Hq, T, T] (one layer's
    attention weights), ``spans`` = (c0, c1, r0, r1): the text's keys ``[c0, c1)`` and the
    replay's queries ``[r0, r1)``. Returns [N, Hkv] = ``log max`` over the replay's queries
    and each KV head's query group."""
    import torch

    c0, c1, r0, r1 = spans
    a = attn[:, r0:r1, c0:c1].amax(dim=1)  # [Hq, N]
    best = a.view(num_kv_heads, a.shape[0] // num_kv_heads, -1).amax(dim=1)  # [Hkv, N]
    return torch.log(best.clamp_min(1e-30)).T


def kvzip_step_target(attn, spans: tuple[int, int, int, int], num_kv_heads: int,
                      step: int = STEP):
    """The engine's KVzip score of each text row per KV head, as a log: ``attn`` [Hq, T, T],
    ``spans`` = (c0, c1, q0, q1): the text's keys ``[c0, c1)`` and the replay's queries
    ``[q0, q1)`` (the repeat prompt and the text again), cut into steps of ``step`` queries
    from ``q0``. Returns [N, Hkv] = ``log max`` over the steps of the sum over the step's
    queries and each KV head's query group."""
    import torch

    c0, c1, q0, q1 = spans
    a = attn[:, q0:q1, c0:c1]  # [Hq, R, N]
    hq, r, n = a.shape
    a = a.reshape(num_kv_heads, hq // num_kv_heads, r, n).sum(1)  # [Hkv, R, N]
    pad = (-r) % step
    if pad:
        a = torch.cat([a, a.new_zeros(num_kv_heads, pad, n)], 1)
    best = a.reshape(num_kv_heads, -1, step, n).sum(2).amax(1)  # [Hkv, N]
    return torch.log(best.clamp_min(1e-30)).T


def text_floor(ys: list[np.ndarray], quantile: float = 0.5) -> float:
    """One text's censoring floor: the ``quantile`` of its targets over every layer and head
    (0.5: their median)."""
    return float(np.quantile(np.concatenate([y.ravel() for y in ys]), quantile))


def collect(hf_dir: str | Path, num_texts: int = 160, num_test: int = 8,
            min_tokens: int = 800, max_tokens: int = 2000, seed: int = 0,
            facts_per_doc: float = 0.0, keep_per_text: int | None = 0,
            censor_quantile: float = 0.5, log=print) -> dict:
    """Normal equations for every target plus held-out (x, y) for the R^2 (module doc); each
    text's censoring floor per target at ``censor_quantile`` (:func:`text_floor`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvcrush_ov.eviction.kvzip import REPEAT_PROMPT

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    cfg = model.config
    num_layers, hq, hkv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    group, d = hq // hkv, cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or d // hq

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    normal = {t: [Normal(np.zeros((d + 1, d + 1)), np.zeros((d + 1, hkv)))
                  for _ in range(num_layers)] for t in TARGETS}
    test = {t: [[] for _ in range(num_layers)] for t in TARGETS}
    test_x: list[list[np.ndarray]] = [[] for _ in range(num_layers)]
    seen: dict[int, tuple] = {}
    span: dict[str, int] = {}
    # rows kept for a non-linear fit (fit_mlp): keep_per_text random rows of each text
    # (None: every row; 0: none)
    kept = {t: [[] for _ in range(num_layers)] for t in TARGETS}
    kept_x: list[list[np.ndarray]] = [[] for _ in range(num_layers)]
    kept_floor: dict[str, list[float]] = {t: [] for t in TARGETS}  # per training text
    test_floor: dict[str, list[float]] = {t: [] for t in TARGETS}  # per held-out text
    sample_rng = np.random.default_rng(seed + 1)

    def hook(module, args, kwargs, output):
        layer = module.layer_idx
        x = kwargs["hidden_states"][0]  # [T, D], the normalised input
        attn = output[1][0]  # [Hq, T, T]
        c0, c1, r0, r1 = span["c0"], span["c1"], span["r0"], span["r1"]
        a = attn[:, r0:r1, c0:c1]  # replay queries on the text's keys
        # value contribution |W_o,h v_i| per query head; v from the layer's v_proj
        v = module.v_proj(x[c0:c1]).view(-1, hkv, head_dim)  # [N, Hkv, Dh]
        wo = module.o_proj.weight.view(d, hq, head_dim)  # [D, Hq, Dh]
        vrep = v.repeat_interleave(group, dim=1)  # [N, Hq, Dh]
        wov = torch.einsum("dhk,nhk->nhd", wo, vrep).norm(dim=-1)  # [N, Hq]
        xn = x[r0:r1].norm(dim=-1)  # [R]
        plus = (a / xn[None, :, None]).amax(dim=1) * wov.T  # [Hq, N]
        plus = plus.view(hkv, group, -1).amax(dim=1)
        seen[layer] = (x[c0:c1].double().numpy(), {
            "kvzip": kvzip_target(attn, (c0, c1, r0, r1), hkv).double().numpy(),
            "kvzip+": torch.log(plus.clamp_min(1e-30)).T.double().numpy(),
            "kvzip-step": kvzip_step_target(attn, (c0, c1, c1, r1), hkv).double().numpy()})
        return output

    handles = [layer.self_attn.register_forward_hook(hook, with_kwargs=True)
               for layer in model.model.layers]
    try:
        all_texts = texts(num_texts + num_test, lambda s: len(enc(s)), min_tokens, max_tokens,
                          seed, facts_per_doc)
        repeat = enc(REPEAT_PROMPT)
        total = 0
        for i, text in enumerate(all_texts):
            ids = enc(text)[:max_tokens]
            bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
            full = bos + ids + repeat + ids
            span.update(c0=len(bos), c1=len(bos) + len(ids), r0=len(bos) + len(ids) + len(repeat),
                        r1=len(full))
            seen.clear()
            with torch.no_grad():  # (scoped: a process-wide switch would leak to the caller)
                model.model(torch.tensor([full]))
            held_out = i >= num_texts
            pick = np.sort(sample_rng.permutation(len(ids))[:keep_per_text])
            keep = keep_per_text is None or keep_per_text > 0
            for t in TARGETS:  # one censoring floor per text and target
                (test_floor if held_out else kept_floor)[t].append(
                    text_floor([seen[layer][1][t] for layer in range(num_layers)],
                               censor_quantile))
            for layer in range(num_layers):
                x, ys = seen[layer]
                gram = None if held_out else Normal.gram(x)  # shared by the targets
                if not held_out and keep:
                    kept_x[layer].append(x[pick].astype(np.float32))
                for t in TARGETS:
                    if held_out:
                        test[t][layer].append(ys[t])
                    else:
                        normal[t][layer].add(x, ys[t], gram)
                        if keep:
                            kept[t][layer].append(ys[t][pick].astype(np.float32))
                if held_out:
                    test_x[layer].append(x)
            total += len(ids)
            log(f"text {i + 1}/{len(all_texts)}: {len(ids)} tokens"
                f"{' (held out)' if held_out else ''}")
    finally:
        for h in handles:
            h.remove()
    return {"normal": normal, "test_x": test_x, "test": test, "kept_x": kept_x, "kept": kept,
            "kept_floor": kept_floor, "test_floor": test_floor, "num_layers": num_layers,
            "num_kv_heads": hkv, "hidden": d, "texts": num_texts, "tokens": total}


def fit(data: dict, target: str, lam: float = 1e-3) -> tuple[np.ndarray, np.ndarray, list]:
    """(weight [L, D, Hkv], bias [L, Hkv], held-out R^2 per layer) for ``target``."""
    ws, bs, r2 = [], [], []
    for layer, ne in enumerate(data["normal"][target]):
        w, b = ne.solve(lam)
        ws.append(w)
        bs.append(b)
        x = np.concatenate(data["test_x"][layer])
        y = np.concatenate(data["test"][target][layer])
        pred = x @ w + b
        r2.append(float(1 - ((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()))
    return (np.asarray(ws, np.float32), np.asarray(bs, np.float32), r2)


def _residual_mlp(x, y, cut: int, w0, b0, hidden: int, epochs: int, lr: float, batch: int):
    """Train ``x @ skip + l2(gelu(l1((x - mu) / sd)))`` on rows ``[:cut]``, early-stopped on
    rows ``[cut:]`` (fit_mlp's doc); returns the folded (w1, b1, w2, b2, skip) tensors."""
    import torch

    gelu = torch.nn.functional.gelu
    mu, sd = x[:cut].mean(0), x[:cut].std(0) + 1e-6
    skip = torch.nn.Linear(x.shape[1], y.shape[1]).to(x.device)
    l1 = torch.nn.Linear(x.shape[1], hidden).to(x.device)
    l2 = torch.nn.Linear(hidden, y.shape[1]).to(x.device)
    params = [*skip.parameters(), *l1.parameters(), *l2.parameters()]
    with torch.no_grad():
        skip.weight.copy_(w0.T)
        skip.bias.copy_(b0)
        l2.weight.zero_()
        l2.bias.zero_()

    def f(xb):
        return skip(xb) + l2(gelu(l1((xb - mu) / sd)))

    best = [p.detach().clone() for p in params]
    if cut < len(x):
        with torch.enable_grad():
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
            best_loss, bad = float("inf"), 0
            for _ in range(epochs):
                order = torch.randperm(cut, device=x.device)
                for i in range(0, cut, batch):
                    idx = order[i:i + batch]
                    opt.zero_grad()
                    ((f(x[idx]) - y[idx]) ** 2).mean().backward()
                    opt.step()
                with torch.no_grad():
                    loss = float(((f(x[cut:]) - y[cut:]) ** 2).mean())
                if loss < best_loss - 1e-5:
                    best_loss, bad = loss, 0
                    best = [p.detach().clone() for p in params]
                else:
                    bad += 1
                    if bad >= 3:
                        break
    with torch.no_grad():
        for p, kept in zip(params, best, strict=True):
            p.copy_(kept)
        w1 = (l1.weight / sd[None, :]).T  # [D, Y]: the input scaling folded in
        b1 = l1.bias - (l1.weight * (mu / sd)[None, :]).sum(1)
        return w1, b1, l2.weight.T, l2.bias + skip.bias, skip.weight.T


def _floors(floors: list[float], parts: list[np.ndarray], device):
    """Each text's floor repeated over its rows: [sum of rows, 1] (f32 on ``device``)."""
    import torch

    rows = np.repeat(np.asarray(floors, np.float32), [len(p) for p in parts])
    return torch.from_numpy(rows[:, None]).to(device)


def fit_mlp(data: dict, target: str, hidden: int = 128, epochs: int = 40, lr: float = 2e-3,
            batch: int = 2048, lam: float = 1e-3, seed: int = 0, device: str = "cpu",
            censor: bool = False, log=print) -> tuple[dict, list[float]]:
    """A residual MLP per layer: ``x @ skip + gelu(x @ w1 + b1) @ w2 + b2``. ``skip`` and the
    bias start as the ridge solution of the kept rows (:func:`fit`'s map) and the MLP's output
    layer at zero, so training starts from the linear surrogate; then mini-batch AdamW on the
    mean squared error of the log score, stopped when the loss on the last twentieth of the
    training texts (at least one text, never the held-out ones) has not improved for 3 epochs,
    and the best epoch is kept. ``device``: a torch device ("cuda" on a GPU machine).
    ``censor``: every row's target is raised to its text's floor (``data["kept_floor"]``,
    ``data["test_floor"]``: a quantile of the text's targets, :func:`text_floor`), the ridge
    start included, and the held-out R^2 is that of the raised scores (predictions raised
    alike). Returns ({w1 [L, D, Y], b1 [L, Y], w2 [L, Y, Hkv], b2 [L, Hkv], skip [L, D, Hkv]},
    held-out R^2 per layer)."""
    import torch

    torch.manual_seed(seed)
    out: dict[str, list[np.ndarray]] = {"w1": [], "b1": [], "w2": [], "b2": [], "skip": []}
    r2 = []
    for layer in range(data["num_layers"]):
        parts = data["kept_x"][layer]
        n_val = max(1, len(parts) // 20) if len(parts) > 1 else 0
        cut = sum(len(p) for p in parts[:len(parts) - n_val])
        x = torch.from_numpy(np.concatenate(parts)).to(device, torch.float32)
        ys = data["kept"][target][layer]
        y = torch.from_numpy(np.concatenate(ys)).to(device, torch.float32)
        if censor:
            y = torch.maximum(y, _floors(data["kept_floor"][target], ys, device))
        ne = normal_of(x[:cut], y[:cut])
        w0, b0 = (torch.from_numpy(a).to(device, torch.float32) for a in ne.solve(lam))
        w1, b1, w2, b2, ws = _residual_mlp(x, y, cut, w0, b0, hidden, epochs, lr, batch)
        with torch.no_grad():
            tx = torch.from_numpy(np.concatenate(data["test_x"][layer])).to(device,
                                                                            torch.float32)
            tys = data["test"][target][layer]
            ty = np.concatenate(tys)
            h = torch.nn.functional.gelu(tx @ w1 + b1)
            pred = (h @ w2 + b2 + tx @ ws).double().cpu().numpy()
            if censor:
                floor = _floors(data["test_floor"][target], tys, "cpu").double().numpy()
                ty, pred = np.maximum(ty, floor), np.maximum(pred, floor)
        r2.append(float(1 - ((ty - pred) ** 2).sum() / ((ty - ty.mean(0)) ** 2).sum()))
        log(f"layer {layer}: held-out R^2 {r2[-1]:.3f}")
        for k, v in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("skip", ws)):
            out[k].append(v.detach().cpu().numpy().astype(np.float32))
    return {k: np.stack(v) for k, v in out.items()}, r2


def predict(weights: dict, x, device: str = "cpu") -> np.ndarray:
    """The surrogate's log scores f32 [L, N, Hkv] of hidden states ``x`` [L, N, D] (numpy or
    torch): ``weights`` as :func:`save` takes them (``weight``, ``bias``; an MLP's
    ``weight2``, ``bias2`` and ``skip``), computed as the graph does (transformations/kvzap.py,
    erf GELU) with torch on ``device``; the distance term is not included."""
    import torch

    def t(a):
        return torch.as_tensor(np.asarray(a, np.float32), device=device)

    with torch.no_grad():
        x = torch.as_tensor(x, device=device).float()
        y = x @ t(weights["weight"]) + t(weights["bias"])[:, None]
        if weights.get("weight2") is not None:
            y = torch.nn.functional.gelu(y) @ t(weights["weight2"]) + \
                t(weights["bias2"])[:, None]
            if weights.get("skip") is not None:
                y = y + x @ t(weights["skip"])
        return y.cpu().numpy()


def fit_position(residual: np.ndarray, logd: np.ndarray, degree: int,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """KVzap's distance term (weights.KVzapWeights.position): per (layer, KV head) the least
    squares fit of ``residual`` f32 [L, N, Hkv] (a target minus the surrogate's prediction) by
    ``c0 + sum_k c_k * logd ** k`` (k = 1..degree), ``logd`` [N] the log distance of each row
    to its text's end (0 for the last token). Returns (intercept [L, Hkv], to add to the
    surrogate's output bias; position [L, degree, Hkv])."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"fit_position: degree={degree!r}, allowed an integer >= 1")
    logd = np.asarray(logd, np.float64)
    if residual.ndim != 3 or residual.shape[1] != len(logd) or len(logd) <= degree:
        raise ValueError(f"fit_position: residual {residual.shape} and {len(logd)} distances "
                         f"(more than {degree} rows needed)")
    basis = np.stack([logd ** k for k in range(degree + 1)], 1)  # [N, degree + 1]
    coef = np.stack([np.linalg.lstsq(basis, r.astype(np.float64), rcond=None)[0]
                     for r in residual])  # [L, degree + 1, Hkv]
    return coef[:, 0].astype(np.float32), coef[:, 1:].astype(np.float32)


def save(path: str | Path, weight: np.ndarray, bias: np.ndarray, target: str,
         meta: dict, weight2: np.ndarray | None = None, bias2: np.ndarray | None = None,
         skip: np.ndarray | None = None, position: np.ndarray | None = None) -> Path:
    """Write a surrogate (weights.KVzapWeights: linear, or an MLP with ``weight2`` /
    ``bias2`` and optionally ``skip``; ``position`` [L, K, Hkv]: its distance term)
    atomically."""
    path = Path(path)
    tmp = path.with_suffix(".tmp.npz")
    two = {} if weight2 is None else {"weight2": weight2.astype(np.float32),
                                      "bias2": bias2.astype(np.float32)}
    if skip is not None:
        two["skip"] = skip.astype(np.float32)
    if position is not None:
        two["position"] = position.astype(np.float32)
    np.savez(tmp, weight=weight.astype(np.float32), bias=bias.astype(np.float32),
             target=np.array(target), meta=np.array(json.dumps(meta)), **two)
    tmp.replace(path)
    return path


def train(model: str | Path, num_texts: int = 30, num_test: int = 6, target: str = "kvzip",
          lam: float = 1e-3, out: str | Path | None = None, seed: int = 0,
          min_tokens: int = 700, max_tokens: int = 1400, facts_per_doc: float = 0.0,
          hidden: int | None = None, keep_per_text: int | None = None,
          censor: bool = False, censor_quantile: float = 0.5,
          log=print) -> tuple[Path, list[float]]:
    """Collect, fit and save a model's surrogate (``model``: registry name or Hugging Face
    checkpoint folder; ``out``: default ``<model cache folder>/kvzap.npz``, where
    ``importance="kvzap"`` reads it). Returns (path, held-out R^2 per layer). Bad arguments
    raise ConfigError naming the field before any work. ``censor`` (an MLP only): see
    :func:`fit_mlp`; its floor is each text's ``censor_quantile`` (:func:`text_floor`)."""
    from kvcrush_ov.errors import ConfigError
    from kvcrush_ov.less.train import resolve_model

    for name, value, low in (("texts", num_texts, 1), ("test_texts", num_test, 1),
                             ("min_tokens", min_tokens, 16), ("max_tokens", max_tokens, 16)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(name, value, f"an integer >= {low}")
    if max_tokens < min_tokens:
        raise ConfigError("max_tokens", max_tokens, f"an integer >= min_tokens = {min_tokens}")
    if target not in TARGETS:
        raise ConfigError("target", target, f"one of {', '.join(TARGETS)}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam > 0:
        raise ConfigError("lam", lam, "a number > 0")
    if isinstance(facts_per_doc, bool) or not isinstance(facts_per_doc, (int, float)) \
            or not 0 <= facts_per_doc <= 1:
        raise ConfigError("facts_per_doc", facts_per_doc, "a number in [0, 1]")
    if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int)
                               or hidden < 1):
        raise ConfigError("hidden", hidden, "None (linear) or an integer >= 1 (MLP width)")
    if hidden is not None and keep_per_text is not None and (
            isinstance(keep_per_text, bool) or not isinstance(keep_per_text, int)
            or keep_per_text < 1):
        raise ConfigError("keep_per_text", keep_per_text,
                          "None (every row) or an integer >= 1 with an MLP")
    if not isinstance(censor, bool) or (censor and hidden is None):
        raise ConfigError("censor", censor, "a bool, True only with an MLP (hidden)")
    if isinstance(censor_quantile, bool) or not isinstance(censor_quantile, (int, float)) \
            or not 0 < censor_quantile < 1:
        raise ConfigError("censor_quantile", censor_quantile, "a number in (0, 1)")
    _, hf = resolve_model(model)
    from kvcrush_ov.kvzap.weights import KVZAP_FILE

    path = Path(out) if out is not None else hf.parent / KVZAP_FILE
    data = collect(hf, num_texts=num_texts, num_test=num_test, min_tokens=min_tokens,
                   max_tokens=max_tokens, seed=seed, facts_per_doc=facts_per_doc,
                   keep_per_text=keep_per_text if hidden is not None else 0,
                   censor_quantile=censor_quantile, log=log)
    meta = {"texts": data["texts"], "test_texts": num_test, "tokens": data["tokens"],
            "lam": lam, "seed": seed, "min_tokens": min_tokens, "max_tokens": max_tokens,
            "facts_per_doc": facts_per_doc, "hidden": hidden, "censor": censor,
            "censor_quantile": censor_quantile if censor else None,
            "source": "HotpotQA paragraphs (RULER 26.3 data)"}
    path.parent.mkdir(parents=True, exist_ok=True)
    if hidden is None:
        w, b, r2 = fit(data, target, lam)
        save(path, w, b, target, {**meta, "r2": r2})
    else:
        mlp, r2 = fit_mlp(data, target, hidden, lam=lam, seed=seed, censor=censor, log=log)
        save(path, mlp["w1"], mlp["b1"], target, {**meta, "r2": r2}, mlp["w2"], mlp["b2"],
             mlp["skip"])
    return path, r2
