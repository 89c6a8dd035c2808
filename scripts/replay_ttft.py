"""TTFT of the eval's query-agnostic score groups on one engine: the parked context read (and,
where the method replays, its replay) before the first token, against the plain prefill:

python scripts/replay_ttft.py [--model NAME] [--tokens 4096] [--repeats 3]
                              [--method full --method kvzap --method kvzap-replay50 ...]

Methods: ``full`` (the plain prefill, no scores), ``kvzip`` (the whole replay,
eval.runner._replay), ``kvzap`` (the surrogate's predictions; needs ``kvcrush-ov kvzap-train``)
and the partial replays ``kvzap-replay12/25/50`` (eval.runner._replay_partial). The engine is
the eval's (u8 cache, steps of 256 tokens); the median over ``--repeats`` contexts of the
essays (bench_serve.prompts_of) is printed with its ratio to ``full``."""

import argparse
import statistics
import time

from kvcrush_ov.bench_serve import prompts_of
from kvcrush_ov.config import CacheEvictionConfig, GenerationConfig, KVCacheConfig, SchedulerConfig
from kvcrush_ov.eval import runner
from kvcrush_ov.eval.methods import METHODS
from kvcrush_ov.eviction.factory import make_spec
from kvcrush_ov.eviction.kvzip import REPEAT_PROMPT
from kvcrush_ov.pipeline import Pipeline

CHOICES = ("full", "kvzip", "kvzap", *runner.PARTIAL_REPLAY)
parser = argparse.ArgumentParser()
parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="name or folder")
parser.add_argument("--tokens", type=int, default=4096, help="context length")
parser.add_argument("--repeats", type=int, default=3, help="contexts (median)")
parser.add_argument("--method", action="append", choices=CHOICES,
                    help="a column (repeat; default: all, full first)")
args = parser.parse_args()
for name, value, low in (("--tokens", args.tokens, 16), ("--repeats", args.repeats, 1)):
    if value < low:
        parser.error(f"{name}={value}: allowed an integer >= {low}")
methods = ["full", *[m for m in (args.method or CHOICES) if m != "full"]]
surrogate = any(m != "full" and m != "kvzip" for m in methods)
pipe = Pipeline(args.model, kv_cache=KVCacheConfig(precision="u8"), backend="native",
                eviction=CacheEvictionConfig(importance="kvzap" if surrogate else "snapkv"),
                scheduler=SchedulerConfig(max_num_batched_tokens=256))
eng, tok = pipe.backend.engine, pipe.tokenizer
repeat = runner.encode_text(tok, REPEAT_PROMPT)
one = GenerationConfig(max_new_tokens=1)
contexts = [runner.encode_text(tok, p)[:args.tokens]
            for p in prompts_of(pipe.model_path, args.repeats, args.tokens)]


def no_text(ids: list[int]) -> str:
    return ""


def ttft(ctx: list[int], method: str) -> float:
    t0 = time.perf_counter()
    if method == "full":
        seq = eng.add_request(ctx, one, set(), no_text)
        runner._drain(eng)
        eng.sequences.pop(seq.seq_id, None)
        return time.perf_counter() - t0
    parent = eng.add_request(ctx, one, set(), no_text, keep_cache=True)
    if method == "kvzip":
        eng.set_spec(parent, make_spec(runner._parent_config("all")))
        runner._drain(eng)
        runner._replay(eng, parent, ctx, repeat, set(), no_text)
    else:
        key = (method, 0.125)
        spec = runner.method_spec(METHODS[method], 0.125, pipe.model_path)
        eng.set_spec(parent, runner._parent_spec("surrogate", [key], {key: spec}))
        runner._drain(eng)
        if method in runner.PARTIAL_REPLAY:
            runner._replay_partial(eng, parent, ctx, repeat, set(), no_text, method)
    took = time.perf_counter() - t0
    eng.release(parent)
    runner._drain(eng)
    eng.sequences.pop(parent.seq_id, None)
    return took


ttft(contexts[0][:512], "full")  # warm-up
base = None
for m in methods:
    t = statistics.median(ttft(c, m) for c in contexts)
    base = base or t
    print(f"{m:16s} {t:6.2f} s  {t / base:5.2f}x", flush=True)
