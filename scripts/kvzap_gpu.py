"""Train KVzap's surrogate (kvcrush_ov/kvzap/train.py) on many texts on a GPU machine.

``kvcrush-ov kvzap-train`` collects KVzip's replay scores with torch on the CPU: 30 texts take
minutes, the 1,200 a residual MLP wants take hours. This script splits the work in two:

1. here, with the project installed: the training texts as token ids (HotpotQA paragraphs,
   train.texts, the same draw as kvzap-train's)::

       python scripts/kvzap_gpu.py texts --model SmolLM2-135M-Instruct --texts 1210 --out T.npz

2. on a machine with a GPU, torch and transformers (no OpenVINO needed): KVzip's targets for
   every text, then the ridge map and the residual MLP of train.py (``fit``, ``fit_mlp``,
   ``save``: this file loads train.py from the checkout, not the package)::

       python scripts/kvzap_gpu.py train --hf HF_DIR --texts-file T.npz --out kvzap.npz \\
           --hidden 128 --keep 600 --test 100:110 --device cuda

``kvzap.npz`` then goes beside the exported model (``<model cache folder>/kvzap.npz``), where
``CacheEvictionConfig(importance="kvzap")`` reads it. Texts ``--test`` are held out for the
R^2; of each training text ``--keep`` random rows are kept (KVzap's paper keeps 500).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np


def _train_module():
    """kvcrush_ov/kvzap/train.py loaded from this checkout (no package import: no OpenVINO)."""
    path = Path(__file__).resolve().parents[1] / "kvcrush_ov" / "kvzap" / "train.py"
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
            log, grid: str = "repeat", seed: int = 0, censor_quantile: float = 0.5) -> dict:
    """train.collect's layout (kept rows per training text, every row of the test texts, one
    censoring floor per text) for ``target`` ("kvzip": ``kt.kvzip_target``, "kvzip-step":
    ``kt.kvzip_step_target``, its steps from the repeat prompt's first token, ``grid``
    "repeat", as the engine's, or from the replayed text's, "text"; ``kt`` is train.py)
    computed on ``device`` (f32, eager attention); ``seed`` draws the kept rows; each text's
    floor is its ``censor_quantile`` (train.text_floor)."""
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
            "test_floor": {target: []}}
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
            for i in range(len(z["lengths"])):
                ids = z["ids"][starts[i]:starts[i + 1]].tolist()
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
                data["test_floor" if i in test else "kept_floor"][target].append(floor)
                if i % 200 == 0:
                    log(f"text {i}")
    finally:
        for h in handles:
            h.remove()
    data["texts"] = len(z["lengths"]) - len([i for i in test if i < len(z["lengths"])])
    return data


def _check_train_args(parser: argparse.ArgumentParser, args) -> tuple[int, int]:
    """(first, last) held-out texts; a bad --test, --keep, --hidden or --texts-file ends the
    run with a message naming the field, before the model is loaded."""
    try:
        lo, hi = (int(v) for v in args.test.split(":"))
    except ValueError:
        parser.error(f"--test {args.test!r}: first:last held-out texts, e.g. 100:110")
    if not Path(args.texts_file).is_file():
        parser.error(f"--texts-file {args.texts_file!r}: a file written by the texts step")
    num = len(np.load(args.texts_file)["lengths"])
    if not 0 <= lo < hi <= num or hi - lo >= num:
        parser.error(f"--test {args.test!r}: 0 <= first < last <= {num} (the file's texts), "
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
    if args.grid != "repeat" and args.target != "kvzip-step":
        parser.error(f"--grid {args.grid}: only with --target kvzip-step")
    if args.censor and not args.hidden:
        parser.error("--censor: only with an MLP (--hidden >= 1)")
    if not 0 < args.censor_quantile < 1:
        parser.error(f"--censor-quantile {args.censor_quantile}: a number in (0, 1)")
    return lo, hi


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
    r.add_argument("--keep", type=int, default=600, help="rows kept of each training text")
    r.add_argument("--test", default="100:110", help="held-out texts, first:last (exclusive)")
    r.add_argument("--device", default="cuda")
    r.add_argument("--target", default="kvzip", choices=("kvzip", "kvzip-step"),
                   help="KVzip's maximum over single replay queries, or the engine's sums over "
                   "replay steps of 16 queries (train.py's doc)")
    r.add_argument("--grid", default="repeat", choices=("repeat", "text"),
                   help="kvzip-step: steps from the repeat prompt (the engine's) or from the "
                   "replayed text (session 28's first experiment, docs/chat.md)")
    r.add_argument("--seed", type=int, default=0, help="the kept rows' and the MLP's draws")
    r.add_argument("--epochs", type=int, default=40, help="the MLP's most epochs")
    r.add_argument("--batch", type=int, default=2048, help="the MLP's rows per step")
    r.add_argument("--lr", type=float, default=2e-3, help="the MLP's AdamW learning rate")
    r.add_argument("--censor", action="store_true",
                   help="with --hidden: each text's scores below its median raised to it")
    r.add_argument("--censor-quantile", type=float, default=0.5,
                   help="with --censor: the floor is this quantile of each text's scores")
    args = p.parse_args(argv)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"{time.time() - t0:7.1f}s {msg}", flush=True)

    if args.step == "texts":
        make_texts(args.model, args.texts, args.out, args.min_tokens, args.max_tokens,
                   args.seed)
        return 0
    lo, hi = _check_train_args(p, args)
    kt = _train_module()
    target = args.target
    data = collect(kt, args.hf, args.texts_file, args.keep, range(lo, hi), args.device, target,
                   log, args.grid, args.seed, args.censor_quantile)
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
            "source": "HotpotQA paragraphs (RULER 26.3 data)", "trained_by": "kvzap_gpu.py",
            "texts_file": json.loads(str(np.load(args.texts_file)["meta"])),
            "r2_ridge": r2_lin, "censor": args.censor, "grid": args.grid, "seed": args.seed,
            "censor_quantile": args.censor_quantile if args.censor else None,
            "epochs": args.epochs,
            "batch": args.batch, "lr": args.lr}
    if not args.hidden:
        kt.save(args.out, w, b, target, {**meta, "hidden": None, "r2": r2_lin})
        return 0
    mlp, r2 = kt.fit_mlp(data, target, args.hidden, epochs=args.epochs, lr=args.lr,
                         batch=args.batch, seed=args.seed, device=args.device,
                         censor=args.censor, log=log)
    log(f"residual MLP {args.hidden}: held-out R^2 {np.mean(r2):.3f} (ridge {np.mean(r2_lin):.3f})")
    kt.save(args.out, mlp["w1"], mlp["b1"], target, {**meta, "hidden": args.hidden, "r2": r2},
            mlp["w2"], mlp["b2"], mlp["skip"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
