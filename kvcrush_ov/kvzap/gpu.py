"""Train KVzap's surrogate (kvcrush_ov/kvzap/train.py) on many texts, on a GPU or the CPU.

The measured recipe in one command (texts, targets, the residual MLP and, where the model's
recipe has one, the distance term; :data:`RECIPES`)::

    kvcrush-ov kvzap-train --model SmolLM2-135M-Instruct --recipe --device cuda

writes ``<model cache folder>/kvzap.npz``. Minutes on a GPU; on a 2-core CPU the 1,200 texts
take hours. The same steps one by one, e.g. on a GPU machine with torch and transformers but
no OpenVINO (``scripts/kvzap_gpu.py`` runs this file without importing the package):

1. with the project installed: the training texts as token ids (HotpotQA paragraphs,
   train.texts, the same draw as kvzap-train's)::

       python scripts/kvzap_gpu.py texts --model SmolLM2-135M-Instruct --texts 1210 --out T.npz

2. KVzip's targets for every text, then the ridge map and the residual MLP of train.py
   (``fit``, ``fit_mlp``, ``save``: this file loads train.py by its path, not the package)::

       python scripts/kvzap_gpu.py train --hf HF_DIR --texts-file T.npz --out kvzap.npz \\
           --censor-quantile Q --device cuda

   The defaults are the recipe measured in docs/chat.md (sessions 28-30): a residual MLP of
   width 128 on 400 rows of each text, the engine's replay-step score on the replayed text's
   grid as the target, each text's scores below its quantile ``Q`` raised to it (0.5 for
   SmolLM2, 0.75 for Qwen2.5-0.5B), 15 epochs of 8,192 rows at lr 4e-3. ``--join N`` trains
   on texts of N of the file's texts each (3: RULER-4K's lengths; measured on Qwen2.5-0.5B in
   docs/chat.md, session 31: below the short texts).

3. optionally, KVzap's distance term (weights.KVzapWeights.position): on texts as long as
   RULER-4K's (``--join`` training texts each) the map's residuals are fitted by a
   polynomial in each row's log distance to the context's end, either right after training
   (``train --position K``) or onto a surrogate trained before::

       python scripts/kvzap_gpu.py position --hf HF_DIR --texts-file T.npz \\
           --surrogate kvzap.npz --out kvzap-dist.npz --degree 1 --texts 6 --end 1000 \\
           --censor-quantile 0.5 --device cpu

``kvzap.npz`` then goes beside the exported model (``<model cache folder>/kvzap.npz``), where
``CacheEvictionConfig(importance="kvzap")`` reads it. Texts ``--test`` are held out for the
R^2; of each training text ``--keep`` random rows are kept (KVzap's paper keeps 500).
Nothing from kvcrush_ov is imported at module level (only the texts step and :func:`recipe`
need the package).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _train_module():
    """train.py beside this file, loaded by its path (no package import: no OpenVINO)."""
    path = Path(__file__).resolve().parent / "train.py"
    spec = importlib.util.spec_from_file_location("kvzap_train", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kvzap_train"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def make_texts(model: str, num: int, out: str, min_tokens: int, max_tokens: int,
               seed: int) -> None:
    from transformers import AutoTokenizer

    from kvcrush_ov.eviction.kvzip import REPEAT_PROMPT
    from kvcrush_ov.kvzap.train import texts
    from kvcrush_ov.less.train import resolve_model

    _, hf = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(str(hf))

    def enc(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    ids = [np.array(enc(t)[:max_tokens], np.int32)
           for t in texts(num, lambda s: len(enc(s)), min_tokens, max_tokens, seed)]
    np.savez(out, lengths=np.array([len(i) for i in ids]), ids=np.concatenate(ids),
             repeat=np.array(enc(REPEAT_PROMPT), np.int32),
             bos=np.array([tok.bos_token_id] if tok.bos_token_id is not None else [], np.int32),
             meta=np.array(json.dumps({"model": model, "texts": num, "min_tokens": min_tokens,
                                       "max_tokens": max_tokens, "seed": seed})))
    print(f"{out}: {len(ids)} texts, {sum(len(i) for i in ids)} tokens")


def collect(kt, hf: str, texts_file: str, keep: int, test: range, device: str, target: str,
            log, grid: str = "repeat", seed: int = 0, censor_quantile: float = 0.5,
            join: int = 1, num: int | None = None, end: int | None = None) -> dict:
    """train.collect's layout (kept rows per training text, every row of the test texts, one
    censoring floor per text) for ``target`` ("kvzip": ``kt.kvzip_target``, "kvzip-step":
    ``kt.kvzip_step_target``, its steps from the repeat prompt's first token, ``grid``
    "repeat", as the engine's, or from the replayed text's, "text"; ``kt`` is train.py)
    computed on ``device`` (f32, eager attention); ``seed`` draws the kept rows; each text's
    floor is its ``censor_quantile`` (train.text_floor). ``join`` consecutive texts of the
    file make one text (longer contexts), the first ``num`` such texts (None: all); with
    ``end``, text ``i`` is the file's texts ``end - join * (i + 1) .. end - join * i - 1``
    (backwards from ``end``, e.g. away from the held-out ones); ``kept_logd`` holds each kept
    row's log distance to its text's end."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32,
                                                 attn_implementation="eager").to(device).eval()
    cfg = model.config
    layers, hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    z = np.load(texts_file)
    starts = np.r_[0, np.cumsum(z["lengths"])]
    repeat, bos = z["repeat"].tolist(), z["bos"].tolist()
    data = {"num_layers": layers, "kept_x": [[] for _ in range(layers)],
            "kept": {target: [[] for _ in range(layers)]}, "kept_floor": {target: []},
            "test_x": [[] for _ in range(layers)], "test": {target: [[] for _ in range(layers)]},
            "test_floor": {target: []}, "kept_logd": []}
    span: dict = {}
    seen: dict = {}
    rng = np.random.default_rng(1 + seed)

    def hook(module, args, kwargs, output):
        c0, c1, r0, r1 = span["c0"], span["c1"], span["r0"], span["r1"]
        attn = output[1][0]
        y = (kt.kvzip_target(attn, (c0, c1, r0, r1), hkv) if target == "kvzip" else
             kt.kvzip_step_target(attn, (c0, c1, c1 if grid == "repeat" else r0, r1),
                                  hkv))  # [N, Hkv]
        seen[module.layer_idx] = (kwargs["hidden_states"][0][c0:c1], y)
        return output

    handles = [m.self_attn.register_forward_hook(hook, with_kwargs=True)
               for m in model.model.layers]
    try:
        with torch.no_grad():
            count = (len(z["lengths"]) if end is None else end) // join
            for i in range(count if num is None else min(num, count)):
                first = i * join if end is None else end - join * (i + 1)
                ids = z["ids"][starts[first]:starts[first + join]].tolist()
                full = bos + ids + repeat + ids
                span.update(c0=len(bos), c1=len(bos) + len(ids),
                            r0=len(bos) + len(ids) + len(repeat), r1=len(full))
                pick = torch.from_numpy(np.sort(rng.permutation(len(ids))[:keep])).to(device)
                model.model(torch.tensor([full], device=device))
                ys = [seen[layer][1] for layer in range(layers)]
                floor = float(torch.quantile(torch.cat([y.flatten() for y in ys]).double(),
                                             censor_quantile))  # train.text_floor
                for layer in range(layers):
                    x, y = seen[layer]
                    if i in test:
                        data["test_x"][layer].append(x.half().cpu().numpy())
                        data["test"][target][layer].append(y.double().cpu().numpy())
                    else:
                        data["kept_x"][layer].append(x[pick].half().cpu().numpy())
                        data["kept"][target][layer].append(y[pick].float().cpu().numpy())
                if i not in test:
                    data["kept_logd"].append(np.log(len(ids) - pick.cpu().numpy()))
                data["test_floor" if i in test else "kept_floor"][target].append(floor)
                if i % 200 == 0:
                    log(f"text {i}")
    finally:
        for h in handles:
            h.remove()
    data["texts"] = len(data["kept_floor"][target])
    return data


def _texts_meta(texts_file: str) -> dict:
    """The texts step's record of how the texts were drawn ({} for a file without one)."""
    with np.load(texts_file) as z:
        return json.loads(str(z["meta"])) if "meta" in z else {}


def _check_train_args(parser: argparse.ArgumentParser, args) -> tuple[int, int]:
    """(first, last) held-out texts; a bad --test, --keep, --hidden or --texts-file ends the
    run with a message naming the field, before the model is loaded."""
    try:
        lo, hi = (int(v) for v in args.test.split(":"))
    except ValueError:
        parser.error(f"--test {args.test!r}: first:last held-out texts, e.g. 100:110")
    if not Path(args.texts_file).is_file():
        parser.error(f"--texts-file {args.texts_file!r}: a file written by the texts step")
    if args.join < 1:
        parser.error(f"--join {args.join}: an integer >= 1 (the file's texts per training text)")
    num = len(np.load(args.texts_file)["lengths"]) // args.join
    if not 0 <= lo < hi <= num or hi - lo >= num:
        parser.error(f"--test {args.test!r}: 0 <= first < last <= {num} (the file's texts"
                     f"{'' if args.join == 1 else f' joined {args.join} each'}), "
                     "leaving training texts")
    if args.keep < 1:
        parser.error(f"--keep {args.keep}: an integer >= 1 (rows kept of each training text)")
    if args.hidden < 0:
        parser.error(f"--hidden {args.hidden}: 0 (the ridge map only) or an MLP width >= 1")
    for name, value in (("--epochs", args.epochs), ("--batch", args.batch)):
        if value < 1:
            parser.error(f"{name} {value}: an integer >= 1")
    if not args.lr > 0:
        parser.error(f"--lr {args.lr}: a number > 0")
    if args.grid is not None and args.target != "kvzip-step":
        parser.error(f"--grid {args.grid}: only with --target kvzip-step")
    args.grid = args.grid or ("text" if args.target == "kvzip-step" else "repeat")
    if args.censor and not args.hidden:
        parser.error("--censor: only with an MLP (--hidden >= 1)")
    if args.censor is None:
        args.censor = bool(args.hidden)
    if not 0 < args.censor_quantile < 1:
        parser.error(f"--censor-quantile {args.censor_quantile}: a number in (0, 1)")
    if args.position < 0:
        parser.error(f"--position {args.position}: 0 (no distance term) or a degree >= 1")
    for name, value in (("--position-join", args.position_join),
                        ("--position-texts", args.position_texts)):
        if value < 1:
            parser.error(f"{name} {value}: an integer >= 1")
    return lo, hi


@dataclass(frozen=True)
class Recipe:
    """A model's measured surrogate recipe (docs/chat.md): ``texts`` training texts of
    700-1,400 tokens, each text's floor at its ``censor_quantile``, and a distance term of
    degree ``position`` fitted afterwards on 64 texts of three (0: none)."""

    texts: int = 1210
    censor_quantile: float = 0.5
    position: int = 0


#: SmolLM2: session 30's surrogate (107.2% / 93.8% on its report at 25% / 12.5%); Qwen2.5-0.5B:
#: session 29's (97.6% / 89.7%); other models: SmolLM2's recipe without the distance term
RECIPES = {"SmolLM2-135M-Instruct": Recipe(1210, 0.5, 1),
           "Qwen2.5-Coder-0.5B-Instruct": Recipe(810, 0.75, 0)}


def recipe(model: str, out: str | Path | None = None, device: str = "cpu",
           texts: int | None = None, tokens: tuple[int, int] = (700, 1400), log=print) -> Path:
    """The model's :data:`RECIPES` surrogate (``model``: registry name or Hugging Face
    checkpoint folder), written to ``out`` (default ``<model cache folder>/kvzap.npz``) through
    the texts, train and position steps of :func:`main`; ``texts`` overrides the recipe's
    count (>= 5; fewer than 120 hold out the last two, else texts 100-109), ``tokens`` the
    texts' (min, max) length (the recipe's 700-1,400; shorter only for plumbing tests)."""
    import tempfile

    from kvcrush_ov.errors import ConfigError
    from kvcrush_ov.kvzap.weights import KVZAP_FILE
    from kvcrush_ov.less.train import resolve_model

    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ConfigError("device", device, "cpu or cuda (a torch device)")
    name, hf = resolve_model(model)
    r = RECIPES.get(name, Recipe())
    num = r.texts if texts is None else texts
    if isinstance(num, bool) or not isinstance(num, int) or num < 5:
        raise ConfigError("texts", num, "an integer >= 5")
    if (not isinstance(tokens, tuple) or len(tokens) != 2
            or any(isinstance(t, bool) or not isinstance(t, int) for t in tokens)
            or not 16 <= tokens[0] <= tokens[1]):
        raise ConfigError("tokens", tokens, "(min, max) integers with 16 <= min <= max")
    path = Path(out) if out is not None else hf.parent / KVZAP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    test = "100:110" if num >= 120 else f"{num - 2}:{num}"
    log(f"{name}: {num} texts, floor quantile {r.censor_quantile}, distance term degree "
        f"{r.position} ({device})")
    with tempfile.TemporaryDirectory(prefix="kvzap-") as tmp:
        t, base = str(Path(tmp) / "texts.npz"), str(Path(tmp) / "base.npz")
        make_texts(str(model), num, t, tokens[0], tokens[1], 0)
        q = str(r.censor_quantile)
        if main(["train", "--hf", str(hf), "--texts-file", t, "--test", test, "--device",
                 device, "--censor-quantile", q,
                 "--out", base if r.position else str(path)]) != 0:
            raise RuntimeError("kvzap recipe: the train step failed")
        if r.position and main(["position", "--hf", str(hf), "--texts-file", t, "--surrogate",
                                base, "--out", str(path), "--degree", str(r.position),
                                "--texts", str(min(64, num // 3)), "--censor-quantile", q,
                                "--device", device]) != 0:
            raise RuntimeError("kvzap recipe: the position step failed")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    t = sub.add_parser("texts", help="training texts as token ids (needs the project)")
    t.add_argument("--model", required=True)
    t.add_argument("--texts", type=int, default=1210)
    t.add_argument("--min-tokens", type=int, default=700)
    t.add_argument("--max-tokens", type=int, default=1400)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    r = sub.add_parser("train", help="targets and fit (needs torch and transformers)")
    r.add_argument("--hf", required=True, help="the model's Hugging Face checkpoint folder")
    r.add_argument("--texts-file", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--hidden", type=int, default=128, help="MLP width (0: the ridge map only)")
    r.add_argument("--keep", type=int, default=400, help="rows kept of each training text")
    r.add_argument("--join", type=int, default=1,
                   help="the file's texts joined into one training text (3: RULER-4K-like "
                   "lengths; --test then counts joined texts)")
    r.add_argument("--test", default="100:110", help="held-out texts, first:last (exclusive)")
    r.add_argument("--device", default="cuda")
    r.add_argument("--target", default="kvzip-step", choices=("kvzip", "kvzip-step"),
                   help="KVzip's maximum over single replay queries, or the engine's sums over "
                   "replay steps of 16 queries (train.py's doc)")
    r.add_argument("--grid", default=None, choices=("repeat", "text"),
                   help="kvzip-step: steps from the repeat prompt (the engine's) or from the "
                   "replayed text (default: the surrogate learns the engine's ranking "
                   "better so, docs/chat.md)")
    r.add_argument("--seed", type=int, default=0, help="the kept rows' and the MLP's draws")
    r.add_argument("--epochs", type=int, default=15, help="the MLP's most epochs")
    r.add_argument("--batch", type=int, default=8192, help="the MLP's rows per step")
    r.add_argument("--lr", type=float, default=4e-3, help="the MLP's AdamW learning rate")
    r.add_argument("--censor", action=argparse.BooleanOptionalAction, default=None,
                   help="each text's scores below a quantile raised to it (default: on with "
                   "an MLP, which only --hidden >= 1 allows)")
    r.add_argument("--censor-quantile", type=float, default=0.5,
                   help="with --censor: the floor is this quantile of each text's scores")
    r.add_argument("--position", type=int, default=0,
                   help="degree of the distance term fitted after the map (0: none; "
                   "weights.KVzapWeights.position)")
    r.add_argument("--position-join", type=int, default=3,
                   help="--position: texts joined into one long text (RULER-4K-like lengths)")
    r.add_argument("--position-texts", type=int, default=64,
                   help="--position: long texts the distance term is fitted on")
    q = sub.add_parser("position", help="fit only the distance term onto a trained surrogate "
                       "(needs torch and transformers)")
    q.add_argument("--hf", required=True, help="the model's Hugging Face checkpoint folder")
    q.add_argument("--texts-file", required=True)
    q.add_argument("--surrogate", required=True, help="a kvzap.npz (its term, if any, refitted)")
    q.add_argument("--out", required=True)
    q.add_argument("--degree", type=int, default=1)
    q.add_argument("--join", type=int, default=3, help="texts joined into one long text")
    q.add_argument("--texts", type=int, default=64, help="long texts fitted on")
    q.add_argument("--end", type=int, default=None,
                   help="long texts taken backwards from this text (default: the file's end)")
    q.add_argument("--keep", type=int, default=400, help="rows kept of each long text")
    q.add_argument("--seed", type=int, default=2, help="the kept rows' draw")
    q.add_argument("--device", default="cuda")
    q.add_argument("--target", default="kvzip-step", choices=("kvzip", "kvzip-step"))
    q.add_argument("--grid", default="text", choices=("repeat", "text"))
    q.add_argument("--censor-quantile", type=float, default=None,
                   help="raise each text's targets to this quantile (as the map was trained)")
    args = p.parse_args(argv)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"{time.time() - t0:7.1f}s {msg}", flush=True)

    if args.step == "texts":
        make_texts(args.model, args.texts, args.out, args.min_tokens, args.max_tokens,
                   args.seed)
        return 0
    if args.step == "position":
        return _position_step(q, args, log)
    lo, hi = _check_train_args(p, args)
    kt = _train_module()
    target = args.target
    data = collect(kt, args.hf, args.texts_file, args.keep, range(lo, hi), args.device, target,
                   log, args.grid, args.seed, args.censor_quantile, join=args.join)
    log(f"collected {data['texts']} training texts")
    import torch

    layers = data["num_layers"]
    data["normal"] = {target: [kt.normal_of(
        torch.from_numpy(np.concatenate(data["kept_x"][layer])).to(args.device),
        torch.from_numpy(np.concatenate(data["kept"][target][layer])).to(args.device))
        for layer in range(layers)]}
    for layer in range(layers):  # the held-out rows in f32 (fit and fit_mlp read them)
        data["test_x"][layer] = [a.astype(np.float32) for a in data["test_x"][layer]]
    w, b, r2_lin = kt.fit(data, target)
    log(f"ridge: held-out R^2 {np.mean(r2_lin):.3f}")
    meta = {"texts": data["texts"], "test_texts": hi - lo, "rows_per_text": args.keep,
            "join": args.join,
            "source": "HotpotQA paragraphs (RULER 26.3 data)", "trained_by": "kvzap_gpu.py",
            "texts_file": _texts_meta(args.texts_file),
            "r2_ridge": r2_lin, "censor": args.censor, "grid": args.grid, "seed": args.seed,
            "censor_quantile": args.censor_quantile if args.censor else None,
            "epochs": args.epochs,
            "batch": args.batch, "lr": args.lr}
    if not args.hidden:
        weights = {"weight": w, "bias": b}
        meta.update(hidden=None, r2=r2_lin)
    else:
        mlp, r2 = kt.fit_mlp(data, target, args.hidden, epochs=args.epochs, lr=args.lr,
                             batch=args.batch, seed=args.seed, device=args.device,
                             censor=args.censor, log=log)
        log(f"residual MLP {args.hidden}: held-out R^2 {np.mean(r2):.3f} (ridge "
            f"{np.mean(r2_lin):.3f})")
        weights = {"weight": mlp["w1"], "bias": mlp["b1"], "weight2": mlp["w2"],
                   "bias2": mlp["b2"], "skip": mlp["skip"]}
        meta.update(hidden=args.hidden, r2=r2)
    if args.position:
        weights["position"], meta["position"] = _fit_position(
            kt, args.hf, args.texts_file, target, weights, log, degree=args.position,
            join=args.position_join, num=args.position_texts, end=None, keep=args.keep,
            device=args.device, grid=args.grid, seed=args.seed + 1,
            censor_quantile=args.censor_quantile if args.censor else None)
    kt.save(args.out, weights["weight"], weights["bias"], target, meta,
            weights.get("weight2"), weights.get("bias2"), weights.get("skip"),
            weights.get("position"))
    return 0


def _position_step(parser: argparse.ArgumentParser, args, log) -> int:
    """The ``position`` step: arguments checked by name before the model is loaded."""
    for name, path in (("--texts-file", args.texts_file), ("--surrogate", args.surrogate)):
        if not Path(path).is_file():
            parser.error(f"--{name.lstrip('-')} {path!r}: an existing file")
    num = len(np.load(args.texts_file)["lengths"])
    end = num if args.end is None else args.end
    for name, value in (("--degree", args.degree), ("--join", args.join),
                        ("--texts", args.texts), ("--keep", args.keep)):
        if value < 1:
            parser.error(f"{name} {value}: an integer >= 1")
    if not args.join <= end <= num:
        parser.error(f"--end {args.end}: from --join ({args.join}) to the file's {num} texts")
    if args.censor_quantile is not None and not 0 < args.censor_quantile < 1:
        parser.error(f"--censor-quantile {args.censor_quantile}: a number in (0, 1)")
    with np.load(args.surrogate) as z:
        if "weight" not in z or "bias" not in z:
            parser.error(f"--surrogate {args.surrogate!r}: a kvzap.npz (weight, bias, ...)")
        weights = {k: np.asarray(z[k], np.float32) for k in
                   ("weight", "bias", "weight2", "bias2", "skip") if k in z}
        target = str(z["target"]) if "target" in z else args.target
        meta = json.loads(str(z["meta"])) if "meta" in z else {}
    kt = _train_module()
    weights["position"], meta["position"] = _fit_position(
        kt, args.hf, args.texts_file, args.target, weights, log, degree=args.degree,
        join=args.join, num=args.texts, end=end, keep=args.keep, device=args.device,
        grid=args.grid, seed=args.seed, censor_quantile=args.censor_quantile)
    meta["position"]["surrogate"] = Path(args.surrogate).name
    kt.save(args.out, weights["weight"], weights["bias"], target, meta,
            weights.get("weight2"), weights.get("bias2"), weights.get("skip"),
            weights["position"])
    return 0


def _fit_position(kt, hf: str, texts_file: str, target: str, weights: dict, log, degree: int,
                  join: int, num: int, end: int | None, keep: int, device: str, grid: str,
                  seed: int, censor_quantile: float | None) -> tuple[np.ndarray, dict]:
    """The distance term (weights.KVzapWeights.position) of ``degree``, fitted on the
    residuals of ``weights``' predictions over ``num`` long texts (``join`` texts each,
    :func:`collect`'s ``end``; targets raised to each text's ``censor_quantile`` unless None,
    as the map was fitted); its intercept is added to the output bias in place. Returns
    (position [L, K, Hkv], what goes into the meta)."""
    censor = censor_quantile is not None
    data = collect(kt, hf, texts_file, keep, range(0), device, target, log, grid, seed,
                   censor_quantile if censor else 0.5, join=join, num=num, end=end)
    layers = data["num_layers"]
    x = np.stack([np.concatenate(data["kept_x"][layer]) for layer in range(layers)])
    ys = data["kept"][target]
    y = np.stack([np.concatenate(ys[layer]) for layer in range(layers)])  # [L, N, Hkv]
    if censor:
        floors = np.concatenate([np.full(len(part), f) for part, f in
                                 zip(ys[0], data["kept_floor"][target], strict=True)])
        y = np.maximum(y, floors[None, :, None])
    pred = kt.predict(weights, x, device)  # raw, as the map was fitted to raised targets
    logd = np.concatenate(data["kept_logd"])
    intercept, position = kt.fit_position(y - pred, logd, degree)
    out = "bias2" if "bias2" in weights else "bias"
    weights[out] = (weights[out] + intercept).astype(np.float32)
    basis = np.stack([logd ** k for k in range(1, degree + 1)], 1)  # [N, K]
    after = pred + intercept[:, None] + np.einsum("nk,lkh->lnh", basis, position)

    def r2(p: np.ndarray) -> float:
        return float(np.mean([1 - ((y[i] - p[i]) ** 2).sum() / ((y[i] - y[i].mean(0)) ** 2).sum()
                              for i in range(layers)]))

    info = {"degree": degree, "join": join, "texts": data["texts"], "end": end, "seed": seed,
            "censor_quantile": censor_quantile, "grid": grid, "rows": int(len(logd)),
            "r2_before": r2(pred), "r2_after": r2(after)}
    log(f"distance term of degree {degree} on {data['texts']} long texts: R^2 "
        f"{info['r2_before']:.3f} -> {info['r2_after']:.3f} (in sample)")
    return position, info


if __name__ == "__main__":
    sys.exit(main())
