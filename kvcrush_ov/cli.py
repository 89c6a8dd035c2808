"""``kvcrush-ov``: models list / fetch, generate, demo."""

from __future__ import annotations

import argparse
import sys

from kvcrush_ov.config import (
    ANCHOR_POINT_MODES,
    BACKENDS,
    EVICTION_MODES,
    IMPORTANCE_METHODS,
    KV_CACHE_PRECISIONS,
    CacheEvictionConfig,
    FastKVConfig,
)
from kvcrush_ov.errors import ConfigError, KVCrushError
from kvcrush_ov.models.registry import DEFAULT_MODEL, WEIGHT_FORMATS


def parse_budget(text: str) -> int | float:
    """``25%`` or ``0.25`` -> fraction of the prompt; ``1024`` -> tokens."""
    s = text.strip()
    try:
        if s.endswith("%"):
            return float(s[:-1]) / 100.0
        if any(c in s for c in ".eE"):
            return float(s)
        return int(s)
    except ValueError:
        raise ConfigError("--budget", text,
                          "a token count (1024), a fraction (0.25) or a percentage (25%)") from None


def _cmd_models_list(args: argparse.Namespace) -> int:
    from kvcrush_ov.models import store
    from kvcrush_ov.models.fetch import list_models

    print(f"cache: {store.home()}  (set KVCRUSH_OV_HOME to move it)")
    for row in list_models():
        fetched = ", ".join(row["fetched"]) or "-"
        print(f"{row['name']:<30} {row['description']}")
        print(f"{'':<30} default {row['default_weight_format']}, context "
              f"{row['context_length']}, download ~{row['download_mb']} MB, fetched: {fetched}")
    return 0


def _cmd_models_fetch(args: argparse.Namespace) -> int:
    from kvcrush_ov.models.fetch import fetch

    print(fetch(args.name, args.weight_format))
    return 0


def _eviction_from_args(args: argparse.Namespace):
    from kvcrush_ov.config import KVCrushConfig

    if args.no_eviction:
        return None
    kvcrush = None if args.kvcrush_share == 0 else KVCrushConfig(
        budget=args.kvcrush_share, anchor_point_mode=args.anchor)
    fastkv = (FastKVConfig(split_layer=args.split_layer, tsp_rate=args.tsp_rate)
              if args.fastkv else None)
    return CacheEvictionConfig(max_cache_size=parse_budget(args.budget), kvcrush=kvcrush,
                               importance=args.importance, mode=args.mode, fastkv=fastkv,
                               plain_prefill=args.plain_prefill)


def _prefill_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--fastkv", action="store_true",
                    help="FastKV's token-selective propagation: a faster long-prompt prefill")
    sp.add_argument("--tsp-rate", type=float, default=0.2,
                    help="with --fastkv: fraction of the prompt past the split layer")
    sp.add_argument("--split-layer", type=int, default=None,
                    help="with --fastkv: the last layer that sees every token (default middle)")
    sp.add_argument("--plain-prefill", action="store_true",
                    help="prompt chunks nobody scores on the plain graph: faster prefill on many "
                         "cores for a second compiled copy of the weights (docs/engine.md)")


def _cmd_generate(args: argparse.Namespace) -> int:
    from kvcrush_ov.config import GenerationConfig, KVCacheConfig
    from kvcrush_ov.pipeline import Pipeline

    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, rng_seed=args.seed,
        stop_strings=tuple(args.stop or ()), apply_chat_template=not args.no_chat_template,
    )
    pipe = Pipeline(args.model, device=args.device,
                    kv_cache=KVCacheConfig(precision=args.precision),
                    eviction=_eviction_from_args(args), backend=args.backend)
    out = pipe.generate(args.prompt, gen, streamer=lambda s: print(s, end="", flush=True))
    m, c = out.metrics[0], out.cache
    budget = f"{m.kv_budget_tokens} tokens" if m.kv_budget_tokens else "full cache"
    print(f"\n\n[{m.num_input_tokens} prompt + {m.num_generated_tokens} generated tokens | "
          f"TTFT {m.ttft_s:.2f} s | {m.tokens_per_s:.1f} tok/s | KV budget {budget} | "
          f"KV held {c.final_kv_bytes / 2**20:.2f} MiB ({c.final_kv_blocks} blocks), "
          f"peak {c.peak_kv_bytes / 2**20:.2f} MiB]", file=sys.stderr)
    if m.fastkv:
        f = m.fastkv
        print(f"[FastKV: layers 0-{f['split_layer']} processed {f['front_tokens']} prompt "
              f"tokens, the deeper layers {f['back_tokens']}"
              + ("" if f["split"] else f" (not split: {f.get('reason')})") + "]",
              file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvcrush_ov.demo import run_demo

    run_demo(model=args.model, budget=parse_budget(args.budget), anchor=args.anchor,
             device=args.device)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from kvcrush_ov.bench import format_rows, run_bench

    if args.repeats < 1:
        raise ConfigError("--repeats", args.repeats, "an integer >= 1")
    if args.new_tokens < 2:
        raise ConfigError("--new-tokens", args.new_tokens, "an integer >= 2 (decode speed needs "
                          "tokens after the first)")
    for model in args.model:
        print(f"{model}:", flush=True)
        rows = run_bench(model, repeats=args.repeats, device=args.device,
                         new_tokens=args.new_tokens)
        print()
        print(format_rows(model, rows), flush=True)
        print()
    return 0


def _cmd_bench_eviction(args: argparse.Namespace) -> int:
    from kvcrush_ov import bench_eviction as be

    if args.long_tokens < 2048:
        raise ConfigError("--long-tokens", args.long_tokens,
                          "an integer >= 2048 (the flat run keeps a 1024-token budget)")
    if args.capacity_full < 1:
        raise ConfigError("--capacity-full", args.capacity_full, "an integer >= 1")
    if args.repeats < 1:
        raise ConfigError("--repeats", args.repeats, "an integer >= 1")

    parts = {"selection": lambda: be.selection(args.model, precision=args.precision,
                                               repeats=args.repeats),
             "ttft": lambda: be.ttft(args.model, precision=args.precision,
                                     repeats=args.repeats),
             "capacity": lambda: be.capacity(args.model, capacity_full=args.capacity_full,
                                             num_requests=4 * args.capacity_full),
             "flat": lambda: be.flat(args.model, long_tokens=args.long_tokens,
                                     repeats=args.repeats)}
    for part in args.part or list(parts):
        print(be.format_figures(f"{part} ({args.model})", parts[part]()), flush=True)
        print()
    return 0


def _cmd_fuzz(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvcrush_ov.fuzz import fuzz, replay
    from kvcrush_ov.pipeline import resolve_model

    if args.runs < 1:
        raise ConfigError("--runs", args.runs, "an integer >= 1")
    if args.group_size < 1:
        raise ConfigError("--group-size", args.group_size, "an integer >= 1")
    if args.timeout <= 0:
        raise ConfigError("--timeout", args.timeout, "seconds > 0")
    if args.seed < 0:
        raise ConfigError("--seed", args.seed, "an integer >= 0")
    model = str(resolve_model(args.model))
    if args.replay:
        results = replay(Path(args.replay), model, args.timeout)
        for r in results:
            print(r["status"], "; ".join(r.get("violations", [])) or r.get("detail", ""))
        return 1 if any(r["status"] == "violation" for r in results) else 0
    s = fuzz(args.runs, args.seed, model, Path(args.out), args.group_size,
             tuple(args.backend or ("native", "genai")), timeout_s=args.timeout)
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(s.violations.items())) or "none"
    print(f"fuzz: {s.runs} runs (seed {args.seed}) in {s.seconds:.0f} s: {s.ok} ok, "
          f"{s.refused} refused by name, {s.failed} violations ({kinds})")
    if s.reproducers:
        print(f"reproducers: {args.out}/ ({len(s.reproducers)} files)")
    return 1 if s.failed else 0


def _cmd_soak(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from pathlib import Path

    from kvcrush_ov.soak import soak

    if not args.minutes > 0:
        raise ConfigError("--minutes", args.minutes, "a number of minutes > 0")
    if args.concurrency < 1:
        raise ConfigError("--concurrency", args.concurrency, "an integer >= 1")
    if not args.sample_every > 0:
        raise ConfigError("--sample-every", args.sample_every, "seconds > 0")
    if args.seed < 0:
        raise ConfigError("--seed", args.seed, "an integer >= 0")
    rep = soak(args.model, args.minutes, args.seed, args.concurrency,
               sample_every_s=args.sample_every)
    drift = rep.drift()
    print(f"soak: {rep.done} requests done, {rep.cancelled} cancelled, {rep.preemptions} "
          f"preemptions in {rep.samples[-1].t_s:.0f} s; RSS drift after warm-up "
          f"{100 * drift:+.2f}%; idle: {rep.idle_blocks:g} blocks, {rep.idle_sequences} "
          f"sequences; invariant errors: {len(rep.invariant_errors)}")
    if args.out:
        Path(args.out).write_text(json.dumps(dataclasses.asdict(rep) | {"drift": drift},
                                             indent=1))
    leak = rep.idle_blocks != 0 or rep.idle_sequences != 0 or rep.invariant_errors
    return 1 if leak else 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from kvcrush_ov.config import KVCacheConfig, SchedulerConfig
    from kvcrush_ov.pipeline import Pipeline

    try:
        import uvicorn

        from kvcrush_ov.server.app import create_app
    except ImportError as e:
        raise KVCrushError(f"the server needs the 'serve' extra: pip install "
                           f"'kvcrush-ov[serve]' ({e})") from None
    if not 0 < args.port < 65536:
        raise ConfigError("--port", args.port, "a TCP port in 1..65535")
    if args.replicas < 1:
        raise ConfigError("--replicas", args.replicas, "an integer >= 1")
    kw = dict(device=args.device,
              kv_cache=KVCacheConfig(precision=args.precision, cache_size=args.cache_size,
                                     num_kv_blocks=args.num_kv_blocks),
              eviction=_eviction_from_args(args),
              scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                        max_num_seqs=args.max_num_seqs))
    pipe = Pipeline(args.model, **kw)  # here too with --ray: a bad setting fails before Ray
    name = args.served_model_name or pipe.model_path.name
    if name.startswith("ov-"):  # a registry folder (models/<name>/ov-fp16): the model's name
        name = pipe.model_path.parent.name
    key = args.api_key or os.environ.get("KVCRUSH_OV_API_KEY") or None
    if args.ray:
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise KVCrushError(f"--ray needs the 'ray' extra: pip install 'kvcrush-ov[ray]' "
                               f"({e})") from None
        from kvcrush_ov.server import ray_serve

        model_path = str(pipe.model_path)
        del pipe
        return ray_serve.run(lambda: Pipeline(model_path, **kw), name, key, args.replicas,
                             args.host, args.port)
    app = create_app(pipe, name, key)
    print(f"[serve] {name} on http://{args.host}:{args.port}/v1 "
          f"({'API key required' if key else 'no API key'})", flush=True)
    from kvcrush_ov.server.app import GracefulServer

    GracefulServer(uvicorn.Config(app, host=args.host, port=args.port,
                                  log_level=args.log_level,
                                  timeout_graceful_shutdown=args.graceful_timeout)).run()
    return 0


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from kvcrush_ov.bench_serve import bench_serve, table

    for name in ("prompt_tokens", "max_tokens", "num_kv_blocks", "requests_per_client"):
        if getattr(args, name) < 1:
            raise ConfigError("--" + name.replace("_", "-"), getattr(args, name),
                              "an integer >= 1")
    clients = args.clients or [8, 32, 64]
    if any(c < 1 for c in clients):
        raise ConfigError("--clients", clients, "integers >= 1")
    parse_budget(args.budget)
    rows = bench_serve(args.model, clients, args.prompt_tokens, args.max_tokens,
                       args.num_kv_blocks, args.requests_per_client, args.budget,
                       args.precision, ("full", "default") if args.mode == "both" else (args.mode,),
                       args.fastkv)
    print(table(rows))
    return 0


def _cmd_bench_prefill(args: argparse.Namespace) -> int:
    from kvcrush_ov.bench_prefill import bench_prefill, table

    lengths = args.tokens or [2048, 4096, 8192, 16384]
    if any(n < 1 for n in lengths):
        raise ConfigError("--tokens", lengths, "integers >= 1")
    if args.repeats < 1:
        raise ConfigError("--repeats", args.repeats, "an integer >= 1")
    fast = FastKVConfig(split_layer=args.split_layer, tsp_rate=args.tsp_rate)
    budget = parse_budget(args.budget)
    CacheEvictionConfig(max_cache_size=budget, fastkv=fast)  # every field named before work
    print(table(bench_prefill(args.model, lengths, args.repeats, budget, fast.tsp_rate,
                              fast.split_layer)))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from kvcrush_ov.eval.ruler import TASKS
    from kvcrush_ov.eval.runner import run_eval

    command = "kvcrush-ov " + shlex.join(sys.argv[1:])
    summary = run_eval(args.model, args.out, tasks=args.task or TASKS, num_samples=args.samples,
                       methods=args.method or None, budgets=args.budget or (0.5, 0.25, 0.125),
                       seed=args.seed, max_seq_length=args.max_seq_length,
                       precision=args.precision, fidelity=not args.no_fidelity,
                       fidelity_samples=args.fidelity_samples, command=command,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       protocol=args.protocol, multi_question=args.multi_question)
    print(summary)
    return 0


def _cmd_eval_explain(args: argparse.Namespace) -> int:
    from kvcrush_ov.eval.explain import explain, format_explanation

    print(format_explanation(explain(args.model, args.task, args.index, args.method, args.budget,
                                     seed=args.seed, precision=args.precision,
                                     protocol=args.protocol)))
    return 0


def _cmd_eval_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvcrush_ov.eval.report import publish

    for path in publish([Path(r) for r in args.run], Path(args.to)):
        print(path)
    return 0


def _cmd_eval_restore(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvcrush_ov.eval.report import restore

    for path in restore(Path(args.source), Path(str(args.model)).name, Path(args.out)):
        print(path)
    return 0


def _cmd_less_train(args: argparse.Namespace) -> int:
    from kvcrush_ov.less.train import TrainConfig, train

    budget = parse_budget(args.budget)
    if not isinstance(budget, float):
        raise ConfigError("--budget", args.budget, "a fraction of the prefix in (0, 1): 0.125 "
                          "or 12.5%")
    if args.finetune is not None:
        from kvcrush_ov.less.finetune import FinetuneConfig, finetune

        budgets = tuple(parse_budget(b) for b in args.finetune_budget or ("0.125", "0.0625"))
        if not all(isinstance(b, float) for b in budgets):
            raise ConfigError("--finetune-budget", args.finetune_budget, "fractions of the "
                              "prefix in (0, 1): 0.125 or 12.5%")
        cfg = FinetuneConfig(model=args.model, budgets=budgets, seq_len=args.seq_len,
                             sequences=args.finetune_sequences, steps=args.finetune,
                             seed=args.seed, weights=args.out,
                             retrieval=args.finetune_retrieval, max_layers=args.finetune_layers)
        cfg.check()  # before the per-layer stage's work
    res = train(TrainConfig(model=args.model, policy=args.policy, budget=budget,
                            seq_len=args.seq_len, sequences=args.sequences, steps=args.steps,
                            hidden=args.hidden, features=args.features, seed=args.seed,
                            out=args.out, restart=args.restart, layers=args.layers))
    print(f"{res.path} ({res.layers_trained}/{res.num_layers} layers trained)")
    if args.finetune is not None and res.layers_trained == res.num_layers:
        r = finetune(cfg)
        print(f"{r.path} (tuned end to end: validation KL relative to no LESS "
              f"{r.relative_before:.4f} -> {r.relative_after:.4f})")
    return 0


def _cmd_kvzap_train(args: argparse.Namespace) -> int:
    from kvcrush_ov.kvzap.train import train

    if args.recipe:
        from kvcrush_ov.kvzap.gpu import recipe

        for field, default in args.recipe_fixed.items():  # the recipe sets these itself
            if getattr(args, field) != default:
                raise ConfigError(f"--{field.replace('_', '-')}", getattr(args, field),
                                  f"left out with --recipe (the recipe's value: {default})")
        path = recipe(args.model, out=args.out, device=args.device, texts=args.texts)
        print(path)
        return 0
    if args.device != "cpu":
        raise ConfigError("--device", args.device, "cpu without --recipe")
    path, r2 = train(args.model, num_texts=30 if args.texts is None else args.texts,
                     num_test=args.test_texts,
                     target=args.target, out=args.out, seed=args.seed,
                     min_tokens=args.min_tokens, max_tokens=args.max_tokens,
                     facts_per_doc=args.facts, hidden=args.hidden, censor=args.censor,
                     censor_quantile=args.censor_quantile)
    print(f"{path} (held-out R^2 per layer: mean {sum(r2) / len(r2):.3f}, "
          f"min {min(r2):.3f})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvcrush-ov", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list or fetch the registry's real models")
    msub = models.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="registry models and which are fetched")
    ml.set_defaults(func=_cmd_models_list)
    mf = msub.add_parser("fetch", help="download, verify, convert and export a model")
    mf.add_argument("name")
    mf.add_argument("--weight-format", choices=WEIGHT_FORMATS, default=None)
    mf.set_defaults(func=_cmd_models_fetch)

    def common(sp: argparse.ArgumentParser, budget: str) -> None:
        sp.add_argument("--model", default=DEFAULT_MODEL, help="registry name or model folder")
        sp.add_argument("--device", default="CPU")
        sp.add_argument("--budget", default=budget,
                        help="total cached tokens: 1024, or a fraction of the prompt (0.25, 25%%)")
        sp.add_argument("--anchor", default="alternating", choices=ANCHOR_POINT_MODES)

    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("prompt")
    common(g, "0.25")
    g.add_argument("--kvcrush-share", type=float, default=0.25,
                   help="share of the budget for KVCrush representatives (0 disables)")
    g.add_argument("--no-eviction", action="store_true", help="keep the full cache")
    g.add_argument("--importance", default="snapkv", choices=IMPORTANCE_METHODS)
    g.add_argument("--mode", default="continuous", choices=EVICTION_MODES)
    _prefill_args(g)
    g.add_argument("--backend", default=None, choices=BACKENDS)
    g.add_argument("--precision", default="u8", choices=KV_CACHE_PRECISIONS)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--no-chat-template", action="store_true")
    g.set_defaults(func=_cmd_generate)

    d = sub.add_parser("demo", help="long document + question: full cache vs KVCrush at 25%%")
    common(d, "0.25")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="backend native vs genai: TTFT and decode speed ratios")
    b.add_argument("--model", action="append", help="registry name or folder (repeatable)")
    b.add_argument("--device", default="CPU")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--new-tokens", type=int, default=64)
    b.set_defaults(func=_cmd_bench)

    be = sub.add_parser("bench-eviction",
                        help="eviction on native: selection cost, capacity, flat decode")
    be.add_argument("--model", default=DEFAULT_MODEL, help="registry name or model folder")
    be.add_argument("--part", action="append",
                    choices=["selection", "ttft", "capacity", "flat"],
                    help="run only this part (repeatable; default all)")
    be.add_argument("--long-tokens", type=int, default=16384,
                    help="context of the flat-decode run")
    be.add_argument("--precision", default="u8", choices=KV_CACHE_PRECISIONS,
                    help="KV cache precision of the selection and ttft runs")
    be.add_argument("--capacity-full", type=int, default=8,
                    help="capacity run: cache size in full 4K requests (4x as many are sent)")
    be.add_argument("--repeats", type=int, default=3,
                    help="measured requests per row of the selection, ttft and flat runs "
                    "(median)")
    be.set_defaults(func=_cmd_bench_eviction)

    from kvcrush_ov.eval.methods import METHODS
    from kvcrush_ov.eval.ruler import TASKS

    fz = sub.add_parser("fuzz", help="random valid configurations and prompts, invariants "
                        "checked on every run, each group in its own process")
    fz.add_argument("--runs", type=int, default=200)
    fz.add_argument("--seed", type=int, default=0)
    fz.add_argument("--model", default="tiny-random-llama")
    fz.add_argument("--backend", action="append", choices=BACKENDS,
                    help="repeat for several (default: native and genai)")
    fz.add_argument("--group-size", type=int, default=8, help="runs per configuration")
    fz.add_argument("--timeout", type=float, default=300.0, help="seconds per group")
    fz.add_argument("--out", default="fuzz-reproducers", help="where failing runs are written")
    fz.add_argument("--replay", help="rerun one reproducer file")
    fz.set_defaults(func=_cmd_fuzz)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on the native engine")
    sv.add_argument("--model", default=DEFAULT_MODEL)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--device", default="CPU")
    sv.add_argument("--precision", default="u8", choices=KV_CACHE_PRECISIONS)
    sv.add_argument("--cache-size", type=float, default=0.0, help="KV cache GB (0: 1 GB)")
    sv.add_argument("--num-kv-blocks", type=int, default=0)
    sv.add_argument("--max-num-batched-tokens", type=int, default=256)
    sv.add_argument("--max-num-seqs", type=int, default=256)
    sv.add_argument("--budget", default="25%", help="default KV budget: 25%%, 0.25 or 1024")
    sv.add_argument("--no-eviction", action="store_true", help="keep the full cache")
    sv.add_argument("--importance", default="snapkv", choices=IMPORTANCE_METHODS)
    sv.add_argument("--anchor", default="alternating", choices=ANCHOR_POINT_MODES)
    sv.add_argument("--kvcrush-share", type=float, default=0.25)
    sv.add_argument("--mode", default="continuous", choices=EVICTION_MODES)
    _prefill_args(sv)
    sv.add_argument("--served-model-name", help="the name clients use (default: the model's)")
    sv.add_argument("--api-key", help="require this key (or set KVCRUSH_OV_API_KEY)")
    sv.add_argument("--log-level", default="warning")
    sv.add_argument("--ray", action="store_true",
                    help="run as a Ray Serve deployment (RAY_ADDRESS: an existing cluster)")
    sv.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray)")
    sv.add_argument("--graceful-timeout", type=float, default=30.0,
                    help="seconds running requests get to finish on SIGTERM")
    sv.set_defaults(func=_cmd_serve)

    bs = sub.add_parser("bench-serve", help="concurrent clients against a real server: full "
                        "cache vs the default eviction at the same cache size")
    bs.add_argument("--model", default=DEFAULT_MODEL)
    bs.add_argument("--clients", type=int, action="append", help="repeat (default 8, 32, 64)")
    bs.add_argument("--prompt-tokens", type=int, default=1024)
    bs.add_argument("--max-tokens", type=int, default=64)
    bs.add_argument("--num-kv-blocks", type=int, default=512, help="the fixed cache of both")
    bs.add_argument("--requests-per-client", type=int, default=2)
    bs.add_argument("--budget", default="25%")
    bs.add_argument("--precision", default="u8", choices=KV_CACHE_PRECISIONS)
    bs.add_argument("--mode", default="both", choices=("both", "full", "default"),
                    help="run only one side (e.g. to split a long run in two)")
    bs.add_argument("--fastkv", action="store_true",
                    help="the default-eviction server also runs FastKV's faster prefill")
    bs.set_defaults(func=_cmd_bench_serve)

    bp = sub.add_parser("bench-prefill", help="TTFT of the ordinary prefill vs FastKV's "
                        "token-selective propagation at several prompt lengths")
    bp.add_argument("--model", default=DEFAULT_MODEL)
    bp.add_argument("--tokens", type=int, action="append",
                    help="prompt length (repeat; default 2048, 4096, 8192, 16384)")
    bp.add_argument("--repeats", type=int, default=2, help="prompts per length (median)")
    bp.add_argument("--budget", default="25%")
    bp.add_argument("--tsp-rate", type=float, default=0.2)
    bp.add_argument("--split-layer", type=int, default=None)
    bp.set_defaults(func=_cmd_bench_prefill)

    sk = sub.add_parser("soak", help="mixed requests with eviction, cancellations and "
                        "preemptions; RSS, blocks and sequences over time")
    sk.add_argument("--minutes", type=float, default=10.0)
    sk.add_argument("--model", default=DEFAULT_MODEL)
    sk.add_argument("--seed", type=int, default=0)
    sk.add_argument("--concurrency", type=int, default=8)
    sk.add_argument("--sample-every", type=float, default=30.0, help="seconds between lines")
    sk.add_argument("--out", help="write the samples as JSON here")
    sk.set_defaults(func=_cmd_soak)

    ev = sub.add_parser("eval", help="RULER accuracy, every method at equal memory (resumable)")
    ev.add_argument("--model", default=DEFAULT_MODEL, help="registry name or model folder")
    ev.add_argument("--out", required=True, help="output folder (results.jsonl, summary.md)")
    ev.add_argument("--task", action="append", choices=TASKS, help="repeatable; default all")
    ev.add_argument("--method", action="append", choices=["full", *METHODS],
                    help="repeatable; default all but the tuning candidates (the full cache "
                         "always runs; 'full' alone: only the full cache)")
    ev.add_argument("--budget", action="append", type=float,
                    help="total budget as a fraction of the prompt (repeatable)")
    ev.add_argument("--samples", type=int, default=20)
    ev.add_argument("--seed", type=int, default=42)
    ev.add_argument("--max-seq-length", type=int, default=4096)
    ev.add_argument("--precision", default="u8", choices=KV_CACHE_PRECISIONS)
    ev.add_argument("--max-num-batched-tokens", type=int, default=256,
                    help="prefill chunk of both backends (default 256, GenAI's)")
    ev.add_argument("--fidelity-samples", type=int, default=None,
                    help="teacher-forced fidelity pass on the first N samples of each task "
                         "(default: all)")
    ev.add_argument("--no-fidelity", action="store_true",
                    help="skip the teacher-forced KL / top-1 pass against the full cache")
    ev.add_argument("--protocol", default="query-aware",
                    choices=["query-aware", "query-agnostic"],
                    help="query-agnostic: compress the context before the question is read "
                         "(native methods only, no fidelity pass)")
    ev.add_argument("--multi-question", action="store_true",
                    help="with --protocol query-agnostic: also ask niah_multiquery's keys one "
                         "per question on the same compressed context")
    ev.set_defaults(func=_cmd_eval)

    ex = sub.add_parser("eval-explain",
                        help="what one method kept of one sample's answer tokens, per layer")
    ex.add_argument("--model", default=DEFAULT_MODEL, help="registry name or model folder")
    ex.add_argument("--task", required=True, choices=TASKS)
    ex.add_argument("--index", type=int, default=0, help="sample index (as in results.jsonl)")
    ex.add_argument("--method", required=True,
                    choices=[m for m, v in METHODS.items() if v.backend == "native"])
    ex.add_argument("--budget", type=float, default=0.25)
    ex.add_argument("--seed", type=int, default=42)
    ex.add_argument("--precision", default="u8", choices=KV_CACHE_PRECISIONS)
    ex.add_argument("--protocol", default="query-aware", choices=["query-aware", "query-agnostic"],
                    help="query-agnostic: the context is compressed before the question is "
                         "read (as eval --protocol query-agnostic)")
    ex.set_defaults(func=_cmd_eval_explain)

    er = sub.add_parser("eval-report", help="publish eval runs: markdown, per-sample JSON, plot")
    er.add_argument("--run", action="append", required=True,
                    help="an eval --out folder (repeatable: one plot panel per run)")
    er.add_argument("--to", default="docs/results/ruler", help="output folder")
    er.set_defaults(func=_cmd_eval_report)

    rs = sub.add_parser("eval-restore",
                        help="rebuild an eval --out folder from published results (to resume "
                             "a partial run on another machine)")
    rs.add_argument("--from", dest="source", default="docs/results/ruler",
                    help="a folder written by eval-report")
    rs.add_argument("--model", required=True,
                    help="the published run's name (e.g. Qwen2.5-Coder-0.5B-Instruct)")
    rs.add_argument("--out", required=True, help="the new run folder")
    rs.set_defaults(func=_cmd_eval_restore)

    lt = sub.add_parser("less-train", help="train a model's LESS kernels (torch, CPU; "
                        "resumable, one layer at a time)")
    lt.add_argument("--model", default=DEFAULT_MODEL, help="registry name or HF checkpoint folder")
    lt.add_argument("--policy", default="snapkv", help="eviction policy simulated (snapkv)")
    lt.add_argument("--budget", default="0.125",
                    help="total tokens the engine's eviction keeps (sinks and recent window "
                    "included), as a fraction of the prefix (0.125 or 12.5%%)")
    lt.add_argument("--seq-len", type=int, default=4096,
                    help="tokens per training sequence; prefixes of seq_len/2 .. seq_len-64 "
                    "are evicted (4096 matches RULER-4K prompts)")
    lt.add_argument("--sequences", type=int, default=64,
                    help="training sequences (validation: another max(2, N // 8))")
    lt.add_argument("--steps", type=int, default=300, help="Adam steps per layer")
    lt.add_argument("--hidden", type=int, default=64, help="hidden size of the feature maps")
    lt.add_argument("--features", type=int, default=8, help="feature dimension F of the state")
    lt.add_argument("--layers", type=int, default=None,
                    help="train at most this many more layers in this run (default: all)")
    lt.add_argument("--out", default=None,
                    help="weights file (default <cache>/models/<name>/less/<policy>.npz)")
    lt.add_argument("--restart", action="store_true",
                    help="train anew instead of resuming an existing file")
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--finetune", type=int, default=None, metavar="STEPS",
                    help="then tune every layer's kernels together for STEPS Adam steps on the "
                    "KL of the next-token distributions to the full cache's")
    lt.add_argument("--finetune-budget", action="append", default=None,
                    help="budgets simulated by --finetune (repeatable; default 0.125 and "
                    "0.0625)")
    lt.add_argument("--finetune-sequences", type=int, default=32,
                    help="training sequences of --finetune (validation: max(4, N // 4))")
    lt.add_argument("--finetune-retrieval", type=float, default=0.5,
                    help="share of --finetune's sequences that ask to repeat a sentence of the "
                    "context (query-aware, like RULER's prompts); the rest continue the text")
    lt.add_argument("--finetune-layers", type=int, default=None,
                    help="keep LESS in at most this many layers, the ones whose state helps "
                    "most (each layer with LESS costs decode time)")
    lt.set_defaults(func=_cmd_less_train)

    kz = sub.add_parser("kvzap-train", help="train a model's KVzap surrogate for "
                        "importance='kvzap' (torch; a quick linear map by default, "
                        "--recipe: the measured one)")
    kz.add_argument("--model", default=DEFAULT_MODEL, help="registry name or HF checkpoint folder")
    kz.add_argument("--recipe", action="store_true",
                    help="the measured recipe of docs/chat.md for this model "
                    "(kvcrush_ov/kvzap/gpu.py's RECIPES: its texts, a residual MLP, its floor "
                    "and distance term; minutes on a GPU, hours on two cores)")
    kz.add_argument("--device", default="cpu", help="with --recipe: cpu or cuda (torch)")
    kz.add_argument("--texts", type=int, default=None,
                    help="training texts (HotpotQA paragraphs; default 30, or the recipe's)")
    kz.add_argument("--test-texts", type=int, default=6, help="held-out texts for the R^2")
    kz.add_argument("--min-tokens", type=int, default=700)
    kz.add_argument("--max-tokens", type=int, default=1400)
    kz.add_argument("--target", default="kvzip",
                    help="kvzip (the replay's attention, the default: docs/chat.md), "
                    "kvzip-step (summed over the engine's replay steps of 16 queries) or kvzip+ "
                    "(KVzap's paper: weighted by the value's output norm)")
    kz.add_argument("--facts", type=float, default=0.0,
                    help="share of paragraphs followed by a sentence holding an arbitrary value")
    kz.add_argument("--hidden", type=int, default=None,
                    help="width of a residual MLP on the linear map (default: the linear map "
                    "alone; many texts want a GPU: scripts/kvzap_gpu.py)")
    kz.add_argument("--censor", action="store_true",
                    help="with --hidden: raise each text's scores below its median to the "
                    "median before the fit (only the order of the kept top counts)")
    kz.add_argument("--censor-quantile", type=float, default=0.5,
                    help="with --censor: each text's floor is this quantile of its scores "
                    "instead of the median (Qwen2.5-0.5B: 0.75, SmolLM2: 0.5; docs/chat.md)")
    kz.add_argument("--seed", type=int, default=0)
    kz.add_argument("--out", default=None,
                    help="output file (default: <model cache folder>/kvzap.npz)")
    kz.set_defaults(func=_cmd_kvzap_train, recipe_fixed={
        d: kz.get_default(d) for d in ("test_texts", "min_tokens", "max_tokens", "target",
                                       "facts", "hidden", "censor", "censor_quantile", "seed")})
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "bench" and not args.model:
        args.model = [DEFAULT_MODEL]
    try:
        return args.func(args)
    except KVCrushError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
