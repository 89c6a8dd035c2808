"""How close a KVzap surrogate's ranking comes to KVzip's, in GPU minutes instead of CPU hours.

A query-agnostic RULER run of one surrogate takes 20-30 minutes per model on two cores; this
script scores what the surrogate would keep without generating anything. Two steps:

1. here, with the project installed: the query-agnostic contexts of RULER samples (the
   templated prompt up to the question, as ``kvcrush-ov eval --protocol query-agnostic``
   prefills it) as token ids, with the positions of the tokens that hold the answers, and what
   the protocol appends (the question, the template's end and the answer prefix; with each
   sample's references and generation length, for scripts/kvzap_ruler_gpu.py)::

       python scripts/kvzap_proxy.py contexts --model SmolLM2-135M-Instruct --seed 7 \\
           --samples 8 --out C.npz

2. on a machine with torch and transformers (a GPU's; no OpenVINO needed): each context is
   replayed as the engine's KVzip replays it (the repeat prompt and the context again; eager
   attention) and ranked by KVzip's score (``train.kvzip_step_target``: the engine's steps of
   16 queries) and by each surrogate given; each ranking keeps a budget as the engine's
   default KVzip / KVzap allocation does (32 sinks and 32 recent tokens, then Ada-KV: every
   (layer, KV head) its best ``alpha`` = 0.2 share of an even split, the rest to the best
   scores of the whole model; block rounding left out)::

       python scripts/kvzap_proxy.py score --hf HF_DIR --contexts C.npz \\
           --surrogate linear=kvzap_a.npz --surrogate mlp=kvzap_b.npz --device cuda

   Printed per (ranking, budget): the share of the answer tokens kept, averaged over layers
   and KV heads, per task and overall ("coverage"), and the share of KVzip's kept rows the
   ranking keeps too ("overlap"). The rows "kvzip" (the reference: overlap 1) and "kvzip-max"
   (KVzip's paper score, the maximum over single queries) come first.

A proxy, not an accuracy: it says which surrogate to spend a RULER run on (docs/chat.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kvzap_gpu import _train_module  # noqa: E402  (train.py loaded without the package)

NIAH = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue",
        "niah_multiquery")
SINKS, RECENT, ALPHA = 32, 32, 0.2  # config.py's start_size, KVZIP_RECENT; KVzip.alpha


def make_contexts(model: str, tasks: list[str], samples: int, seed: int, max_seq_length: int,
                  out: str) -> None:
    import openvino_genai as ov_genai
    from transformers import AutoTokenizer

    from kvcrush_ov.eval.ruler import build_task, question_start
    from kvcrush_ov.eval.runner import chat_wrap, context_and_question, encode_text
    from kvcrush_ov.eviction.kvzip import REPEAT_PROMPT
    from kvcrush_ov.less.train import resolve_model

    _, hf = resolve_model(model)
    ov_dir = next((d for d in sorted(hf.parent.glob("ov-*"))
                   if (d / "openvino_tokenizer.xml").is_file()), None)
    if ov_dir is None:
        raise SystemExit(f"--model {model!r}: no exported model beside {hf} (kvcrush-ov models "
                         "fetch first)")
    tok = ov_genai.Tokenizer(str(ov_dir))
    fast = AutoTokenizer.from_pretrained(str(hf))
    wrap = chat_wrap(tok)
    ids, needles, asks, meta = [], [], [], []
    for task in tasks:
        for s in build_task(task, samples, lambda text: len(encode_text(tok, text)),
                            max_seq_length=max_seq_length, seed=seed, wrap=wrap):
            ctx, ask = context_and_question(tok, s, wrap)
            prompt = s.prompt(wrap)  # context_and_question's cut, as text for the offsets
            text = prompt[:prompt.index(s.input) + question_start(s.task, s.input)]
            enc = fast(text, add_special_tokens=False, return_offsets_mapping=True)
            if enc["input_ids"] != ctx:  # offsets from the same ids only
                raise SystemExit(f"{task} #{s.index}: the Hugging Face tokenizer does not "
                                 "reproduce the context's ids")
            pos: set[int] = set()
            for value in s.outputs:
                at = text.find(value)
                while at >= 0:  # every occurrence of the answer in the context
                    pos.update(j for j, (a, b) in enumerate(enc["offset_mapping"])
                               if b > at and a < at + len(value))
                    at = text.find(value, at + 1)
            ids.append(np.asarray(ctx, np.int32))
            needles.append(np.asarray(sorted(pos), np.int32))
            asks.append(np.asarray(ask, np.int32))
            meta.append({"task": task, "index": s.index, "tokens": len(ctx),
                         "outputs": list(s.outputs), "max_new_tokens": s.max_new_tokens})
    np.savez(out, lengths=np.array([len(i) for i in ids]), ids=np.concatenate(ids),
             needle_lengths=np.array([len(n) for n in needles]),
             needles=np.concatenate(needles) if needles else np.zeros(0, np.int32),
             ask_lengths=np.array([len(a) for a in asks]), asks=np.concatenate(asks),
             repeat=np.asarray(encode_text(tok, REPEAT_PROMPT), np.int32),
             meta=np.array(json.dumps({"model": model, "seed": seed, "samples": meta})))
    print(f"{out}: {len(ids)} contexts, {sum(len(i) for i in ids)} tokens")


def read_contexts(path: str) -> tuple[list[dict], list[int]]:
    """The contexts step's file: one dict per sample (its meta, ``ids`` and ``needles`` int32
    arrays, and ``ask``: the ids appended after the context, None in files written before the
    questions were kept) and the repeat prompt's ids."""
    with np.load(path) as z:
        def split(values: str, lengths: str) -> list[np.ndarray]:
            at = np.r_[0, np.cumsum(z[lengths])]
            return [z[values][a:b] for a, b in zip(at[:-1], at[1:], strict=True)]

        samples = json.loads(str(z["meta"]))["samples"]
        asks = split("asks", "ask_lengths") if "asks" in z else [None] * len(samples)
        out = [{**m, "ids": i, "needles": n, "ask": a} for m, i, n, a in
               zip(samples, split("ids", "lengths"), split("needles", "needle_lengths"), asks,
                   strict=True)]
        return out, z["repeat"].tolist()


def predict(kt, weights: dict, x):
    """A surrogate's log scores: ``x`` [L, N, D] -> [L, N, Hkv], the map as train.predict
    computes it (``kt`` is train.py) plus its distance term, the rows' distance counted from
    the context's last token, as the engine ranks right after it."""
    import torch

    out = torch.from_numpy(kt.predict(weights, x, str(x.device))).to(x.device)
    if "position" in weights:
        n = x.shape[1]
        logd = torch.log(torch.arange(n, 0, -1, device=x.device, dtype=torch.float32))
        coefs = torch.from_numpy(np.asarray(weights["position"], np.float32)).to(x.device)
        for k, coef in enumerate(coefs.unbind(1)):  # coef [L, Hkv]
            out = out + coef[:, None, :] * logd[None, :, None] ** (k + 1)
    return out


def keep_mask(scores, fraction: float):
    """The rows a budget of ``fraction`` of the context keeps per (layer, KV head) beside the
    sinks and the recent window: [L * Hkv, N - SINKS - RECENT] bool (module doc)."""
    import torch

    layers, n, heads = scores.shape
    mid = scores[:, SINKS:n - RECENT].permute(0, 2, 1).reshape(layers * heads, -1)
    budget = min(mid.shape[1], max(0, int(fraction * n) - SINKS - RECENT))
    keep = torch.zeros_like(mid, dtype=torch.bool)
    own = int(ALPHA * budget)
    if own:
        keep.scatter_(1, mid.topk(own, dim=1).indices, True)
    rest = budget * layers * heads - int(keep.sum())
    if rest > 0:
        keep.view(-1)[mid.masked_fill(keep, float("-inf")).flatten().topk(rest).indices] = True
    return keep


def score(hf: str, contexts: str, surrogates: dict[str, str], budgets: list[float],
          device: str) -> list[dict]:
    """One record per (ranking, budget, task): coverage and overlap (module doc)."""
    import torch
    from transformers import AutoModelForCausalLM

    kt = _train_module()
    weights = {name: dict(np.load(path)) for name, path in surrogates.items()}
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32,
                                                 attn_implementation="eager").to(device).eval()
    layers, hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    samples, repeat = read_contexts(contexts)
    seen: dict = {}

    def hook(module, args, kwargs, output):
        c0, c1, r1 = seen["span"]
        attn = output[1][0]
        seen[module.layer_idx] = (kwargs["hidden_states"][0][c0:c1],
                                  kt.kvzip_step_target(attn, (c0, c1, c1, r1), hkv),
                                  kt.kvzip_target(attn, (c0, c1, c1 + len(repeat), r1), hkv))
        return output

    handles = [m.self_attn.register_forward_hook(hook, with_kwargs=True)
               for m in model.model.layers]
    per: dict[tuple, list] = {}
    try:
        with torch.no_grad():
            for s in samples:
                ctx = s["ids"].tolist()
                seen["span"] = (0, len(ctx), 2 * len(ctx) + len(repeat))
                model.model(torch.tensor([ctx + repeat + ctx], device=device))
                x = torch.stack([seen[k][0] for k in range(layers)])
                truth = torch.stack([seen[k][1] for k in range(layers)])
                ranks = {"kvzip": truth, "kvzip-max": torch.stack([seen[k][2]
                                                                    for k in range(layers)])}
                ranks.update({name: predict(kt, w, x) for name, w in weights.items()})
                need = torch.from_numpy(s["needles"].astype(np.int64)).to(device) - SINKS
                for b in budgets:
                    ref = keep_mask(truth, b)
                    need_b = need[(need >= 0) & (need < ref.shape[1])]
                    for name, r in ranks.items():
                        keep = keep_mask(r, b)
                        cov = float(keep[:, need_b].float().mean()) if len(need_b) else 1.0
                        over = float((keep & ref).sum() / ref.sum().clamp_min(1))
                        per.setdefault((name, b, s["task"]), []).append((cov, over))
    finally:
        for h in handles:
            h.remove()
    return [{"ranking": k[0], "budget": k[1], "task": k[2], "samples": len(v),
             "coverage": float(np.mean([c for c, _ in v])),
             "overlap": float(np.mean([o for _, o in v]))} for k, v in per.items()]


def table(records: list[dict]) -> str:
    """Markdown: one row per (ranking, budget), coverage per task, then means."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    rows = ["| ranking | budget | " + " | ".join(tasks) + " | coverage | overlap |",
            "|---|---|" + "---|" * (len(tasks) + 2)]
    for key in dict.fromkeys((r["ranking"], r["budget"]) for r in records):
        mine = {r["task"]: r for r in records if (r["ranking"], r["budget"]) == key}
        n = sum(r["samples"] for r in mine.values())
        cov = sum(r["coverage"] * r["samples"] for r in mine.values()) / n
        over = sum(r["overlap"] * r["samples"] for r in mine.values()) / n
        rows.append(f"| {key[0]} | {key[1]} | "
                    + " | ".join(f"{mine[t]['coverage']:.3f}" if t in mine else "-"
                                 for t in tasks) + f" | {cov:.3f} | {over:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    c = sub.add_parser("contexts", help="RULER contexts as token ids (needs the project)")
    c.add_argument("--model", required=True)
    c.add_argument("--task", action="append", default=None, help=f"default: {', '.join(NIAH)}")
    c.add_argument("--samples", type=int, default=8)
    c.add_argument("--seed", type=int, default=7, help="7: the tuning seed")
    c.add_argument("--max-seq-length", type=int, default=4096)
    c.add_argument("--out", required=True)
    s = sub.add_parser("score", help="rank and compare (needs torch and transformers)")
    s.add_argument("--hf", required=True, help="the model's Hugging Face checkpoint folder")
    s.add_argument("--contexts", required=True, help="a file written by the contexts step")
    s.add_argument("--surrogate", action="append", default=[], metavar="NAME=PATH")
    s.add_argument("--budget", action="append", type=float, default=None,
                   help="fraction of the context kept (default: 0.25 and 0.125)")
    s.add_argument("--device", default="cuda")
    s.add_argument("--out", default=None, help="also write the records as JSON here")
    args = p.parse_args(argv)
    if args.step == "contexts":
        from kvcrush_ov.eval.ruler import EXTRA_TASKS, TASKS

        if args.samples < 1:
            p.error(f"--samples {args.samples}: an integer >= 1")
        if args.max_seq_length < 1:
            p.error(f"--max-seq-length {args.max_seq_length}: an integer >= 1")
        bad = [t for t in args.task or [] if t not in TASKS + EXTRA_TASKS]
        if bad:
            p.error(f"--task {bad[0]!r}: one of {', '.join(TASKS + EXTRA_TASKS)}")
        make_contexts(args.model, args.task or list(NIAH), args.samples, args.seed,
                      args.max_seq_length, args.out)
        return 0
    surrogates = {}
    for item in args.surrogate:
        name, _, path = item.partition("=")
        if not name or not path or not Path(path).is_file() or name in ("kvzip", "kvzip-max"):
            p.error(f"--surrogate {item!r}: NAME=PATH of a kvzap.npz (NAME not kvzip or "
                    "kvzip-max)")
        surrogates[name] = path
    budgets = args.budget or [0.25, 0.125]
    if not all(0 < b < 1 for b in budgets):
        p.error(f"--budget {budgets}: fractions in (0, 1)")
    if not Path(args.contexts).is_file():
        p.error(f"--contexts {args.contexts!r}: a file written by the contexts step")
    records = score(args.hf, args.contexts, surrogates, budgets, args.device)
    print(table(records))
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
