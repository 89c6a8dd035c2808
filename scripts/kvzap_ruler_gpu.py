"""RULER's query-agnostic protocol on a GPU, eviction emulated by attention masks: which KVzap
surrogate to spend an engine run on, from many samples in minutes.

A query-agnostic RULER run of one surrogate takes 20-30 minutes per model on two cores, and
on 8 samples per task a retrain alone moves it by up to 7 points (docs/chat.md, session 32).
This script answers the questions instead of scoring a proxy:

1. here, with the project installed: ``python scripts/kvzap_proxy.py contexts --model M
   --seed 7 --samples 30 --out C.npz`` (the contexts, the questions appended after them, the
   references);
2. on a machine with torch and transformers (a GPU's; no OpenVINO)::

       python scripts/kvzap_ruler_gpu.py answer --hf HF_DIR --contexts C.npz \\
           --surrogate a=kvzap_a.npz --surrogate b=kvzap_b.npz --budget 0.125 \\
           --kvzip --device cuda --out answers.json

   Each context is read once with the full cache (the model's hidden states give every
   surrogate's scores; ``--kvzip`` also replays it as the engine's KVzip does, for KVzip's own
   ranking); each (ranking, budget) keeps what kvzap_proxy.keep_mask keeps (32 sinks, 32
   recent tokens, Ada-KV with alpha 0.2 over the whole model; no block rounding, the cache in
   the checkpoint's precision, not the engine's u8), and the evicted rows of every (layer, KV
   head) are masked out of the attention of the question and of every generated token. All
   rankings answer in one batch, greedily, up to the task's ``max_new_tokens`` or the end of
   the turn. ``full`` is the unmasked cache.
3. here: ``python scripts/kvzap_ruler_gpu.py table --answers answers.json --model M``
   decodes with the exported model's tokenizer and scores with RULER's metric
   (kvcrush_ov.eval.ruler.score): average per task and overall, and % of ``full``.

An emulation for choosing, not a result: the figures issue 20 asks for come from the engine
(``kvcrush-ov eval``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kvzap_gpu import _train_module  # noqa: E402
from kvzap_proxy import RECENT, SINKS, keep_mask, predict, read_contexts  # noqa: E402

#: per layer: bool [B, Hkv, K0], the first K0 keys each batch row and KV head may attend to
KEEP: dict[int, object] = {}
#: whether the attention weights are returned (KVzip's replay reads them); without them and
#: without KEEP a prompt read from an empty cache runs torch's fused attention
WEIGHTS = {"need": False}


def masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     **kwargs):
    """Eager attention with the causal mask and, where ``KEEP`` has the layer, each (row, KV
    head)'s evicted keys masked out. query [B, Hq, Q, D], key / value [B, Hkv, K, D] ->
    (output [B, Q, Hq, D], weights [B, Hq, Q, K]; None from the fused path, :data:`WEIGHTS`)."""
    import torch

    b, hq, q, d = query.shape
    hkv, k = key.shape[1], key.shape[2]
    group = hq // hkv
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    keep = KEEP.get(module.layer_idx)
    if keep is None and not WEIGHTS["need"] and q == k:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling or d ** -0.5)
        return out.transpose(1, 2).contiguous(), None
    w = torch.matmul(query.float(), key.float().transpose(-1, -2)) * (scaling or d ** -0.5)
    allowed = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)[None, None]
    if keep is not None:
        cols = torch.ones(b, hq, 1, k, dtype=torch.bool, device=query.device)
        cols[..., :keep.shape[-1]] = keep.repeat_interleave(group, 1)[:, :, None, :]
        allowed = allowed & cols
    p = torch.softmax(w.masked_fill(~allowed, float("-inf")), -1)
    out = torch.matmul(p.to(value.dtype), value).transpose(1, 2).contiguous()
    return out, p


def full_keep(mask, n: int, layers: int, heads: int):
    """keep_mask's [L * Hkv, N - sinks - recent] as bool [L, Hkv, N] with sinks and recent."""
    import torch

    keep = torch.ones(layers * heads, n, dtype=torch.bool, device=mask.device)
    keep[:, SINKS:n - RECENT] = mask
    return keep.view(layers, heads, n)


def answer(hf: str, contexts: str, surrogates: dict[str, str], budgets: list[float],
           kvzip: bool, device: str, log=print) -> list[dict]:
    """One record per (sample, ranking, budget): the generated token ids (module doc)."""
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache

    AttentionInterface.register("kvzap_masked", masked_attention)
    kt = _train_module()
    weights = {name: dict(np.load(path)) for name, path in surrogates.items()}
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32,
                                                 attn_implementation="kvzap_masked")
    model = model.to(device).eval()
    layers, hkv = model.config.num_hidden_layers, model.config.num_key_value_heads
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    samples, repeat = read_contexts(contexts)
    seen: dict = {}

    def hook(module, args, kwargs, output):
        if not seen.get("collect"):
            return output
        c0, c1, r1 = seen["span"]
        if seen.get("replay"):
            seen[module.layer_idx] = kt.kvzip_step_target(output[1][0], (c0, c1, c1, r1), hkv)
        else:
            seen[module.layer_idx] = kwargs["hidden_states"][0][c0:c1]
        return output

    handles = [m.self_attn.register_forward_hook(hook, with_kwargs=True)
               for m in model.model.layers]
    records = []
    t0 = time.time()
    try:
        with torch.no_grad():
            for i, s in enumerate(samples):
                ctx, ask = s["ids"].tolist(), s["ask"].tolist()
                n = len(ctx)
                KEEP.clear()
                seen.update(span=(0, n, n), replay=False, collect=True)
                cache = DynamicCache()
                model(torch.tensor([ctx], device=device), past_key_values=cache, use_cache=True)
                x = torch.stack([seen[k] for k in range(layers)])
                ranks = {name: predict(kt, w, x) for name, w in weights.items()}
                if kvzip:
                    seen.update(span=(0, n, 2 * n + len(repeat)), replay=True)
                    WEIGHTS["need"] = True
                    try:
                        model.model(torch.tensor([ctx + repeat + ctx], device=device))
                    finally:
                        WEIGHTS["need"] = False
                    ranks = {"kvzip": torch.stack([seen[k] for k in range(layers)]), **ranks}
                seen["collect"] = False
                rows = [("full", 1.0, None)] + [(name, b, full_keep(keep_mask(r, b), n, layers,
                                                                    hkv))
                                                for b in budgets for name, r in ranks.items()]
                for layer in range(layers):
                    KEEP[layer] = torch.stack([
                        m[layer] if m is not None else torch.ones(hkv, n, dtype=torch.bool,
                                                                 device=device)
                        for _, _, m in rows])
                cache.batch_repeat_interleave(len(rows))
                inp = torch.tensor([ask] * len(rows), device=device)
                out = [[] for _ in rows]
                done = [False] * len(rows)
                for _ in range(int(s["max_new_tokens"])):
                    logits = model(inp, past_key_values=cache, use_cache=True).logits[:, -1]
                    nxt = logits.argmax(-1).tolist()
                    for r, t in enumerate(nxt):
                        if not done[r]:
                            if t in eos:
                                done[r] = True
                            else:
                                out[r].append(int(t))
                    if all(done):
                        break
                    inp = torch.tensor(nxt, device=device)[:, None]
                for (name, b, _), ids in zip(rows, out, strict=True):
                    records.append({"task": s["task"], "index": s["index"], "ranking": name,
                                    "budget": b, "ids": ids, "outputs": s["outputs"]})
                if (i + 1) % 10 == 0:
                    log(f"{i + 1}/{len(samples)} samples, {time.time() - t0:.0f}s")
    finally:
        for h in handles:
            h.remove()
        KEEP.clear()
    return records


def table(records: list[dict], model: str) -> str:
    """Markdown: one row per (ranking, budget): RULER's score per task, the average and % of
    ``full`` (decoded with the exported model's tokenizer; needs the project)."""
    import openvino_genai as ov_genai

    from kvcrush_ov.eval.ruler import score
    from kvcrush_ov.less.train import resolve_model

    _, hf = resolve_model(model)
    ov_dir = next(d for d in sorted(hf.parent.glob("ov-*"))
                  if (d / "openvino_tokenizer.xml").is_file())
    tok = ov_genai.Tokenizer(str(ov_dir))
    per: dict[tuple, dict[str, list[float]]] = {}
    for r in records:
        text = tok.decode(r["ids"], skip_special_tokens=True)
        per.setdefault((r["ranking"], r["budget"]), {}).setdefault(r["task"], []).append(
            100 * score(r["task"], text, r["outputs"]))
    tasks = list(dict.fromkeys(r["task"] for r in records))
    n = len(next(iter(per.values()))[tasks[0]])
    full = np.mean([np.mean(v) for v in per[("full", 1.0)].values()])
    rows = [f"({n} samples per task)", "",
            "| ranking | budget | " + " | ".join(tasks) + " | avg | % of full |",
            "|---|---|" + "---|" * (len(tasks) + 2)]
    for (name, b), mine in per.items():
        avg = np.mean([np.mean(mine[t]) for t in tasks])
        rows.append(f"| {name} | {b} | " + " | ".join(f"{np.mean(mine[t]):.1f}" for t in tasks)
                    + f" | {avg:.1f} | " + (f"{100 * avg / full:.1f} |" if full else "- |"))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    a = sub.add_parser("answer", help="answer on the GPU (needs torch and transformers)")
    a.add_argument("--hf", required=True, help="the model's Hugging Face checkpoint folder")
    a.add_argument("--contexts", required=True, help="kvzap_proxy.py contexts' file")
    a.add_argument("--surrogate", action="append", default=[], metavar="NAME=PATH")
    a.add_argument("--budget", action="append", type=float, default=None,
                   help="fraction of the context kept (default: 0.125)")
    a.add_argument("--kvzip", action="store_true", help="also KVzip's replay ranking")
    a.add_argument("--device", default="cuda")
    a.add_argument("--out", required=True, help="the answers as JSON")
    t = sub.add_parser("table", help="decode and score the answers (needs the project)")
    t.add_argument("--answers", required=True)
    t.add_argument("--model", required=True, help="the registry model (its tokenizer)")
    args = p.parse_args(argv)
    if args.step == "table":
        if not Path(args.answers).is_file():
            p.error(f"--answers {args.answers!r}: a file written by the answer step")
        print(table(json.loads(Path(args.answers).read_text()), args.model))
        return 0
    surrogates = {}
    for item in args.surrogate:
        name, _, path = item.partition("=")
        if not name or not path or not Path(path).is_file() or name in ("kvzip", "full"):
            p.error(f"--surrogate {item!r}: NAME=PATH of a kvzap.npz (NAME not kvzip or full)")
        surrogates[name] = path
    budgets = args.budget or [0.125]
    if not all(0 < b < 1 for b in budgets):
        p.error(f"--budget {budgets}: fractions in (0, 1)")
    if not Path(args.contexts).is_file():
        p.error(f"--contexts {args.contexts!r}: a file written by kvzap_proxy.py contexts")
    with np.load(args.contexts) as z:
        if "asks" not in z:
            p.error(f"--contexts {args.contexts!r}: written before the questions were kept; "
                    "run kvzap_proxy.py contexts again")
    records = answer(args.hf, args.contexts, surrogates, budgets, args.kvzip, args.device)
    Path(args.out).write_text(json.dumps(records))
    print(f"{args.out}: {len(records)} answers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
