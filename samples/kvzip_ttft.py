"""What KVzip's replay costs: TTFT of the default eviction (SnapKV + KVCrush, which evicts right
after the prompt) vs KVzip (which replays the prompt first), at the same budget:
python samples/kvzip_ttft.py [--model NAME] [--tokens 2048 --tokens 4096] [--repeats 2]
                             [--replay-chunk 16 --replay-chunk 256] [--heads] [--kvzap]
                             [--no-kvzip] [--replay-group 16]
``--replay-chunk``: the replay's queries per step (KVzip.replay_chunk; a tuning knob, set here
on the engine's default spec), one KVzip column each. ``--heads``: also KVzip's
context-independent variant (``kvzip-heads``: heads chosen once per model, no replay; calibrated
on first use, eviction/kvzip_heads.py). ``--kvzap``: also KVzap (KVzip's scores predicted by
a trained surrogate, no replay; needs ``kvcrush-ov kvzap-train`` first) and the full cache (no
eviction, the plain prefill). ``--no-kvzip``: leave KVzip's replay columns out.
``--replay-group N``: the KVzip columns score the replay by aligned groups of N queries beside
the step (KVzip's ``replay_group``; each ``--replay-chunk`` a multiple of N) instead of by the
step's own sums."""

import argparse
import dataclasses
import statistics

import kvcrush_ov as kv
from kvcrush_ov.bench_serve import prompts_of
from kvcrush_ov.eviction.kvzip import REPLAY_CHUNK, KVzip, with_replay_group
from kvcrush_ov.eviction.kvzip_heads import KVzipHeads, load_or_calibrate
from kvcrush_ov.pipeline import resolve_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="name or folder")
parser.add_argument("--tokens", type=int, action="append", help="prompt length (repeat)")
parser.add_argument("--repeats", type=int, default=2, help="prompts per length (median)")
parser.add_argument("--replay-chunk", type=int, action="append",
                    help=f"KVzip's replay step in queries (repeat; default {REPLAY_CHUNK})")
parser.add_argument("--heads", action="store_true", help="also the kvzip-heads column")
parser.add_argument("--kvzap", action="store_true", help="also the kvzap and full-cache columns")
parser.add_argument("--no-kvzip", action="store_true", help="no KVzip replay column")
parser.add_argument("--replay-group", type=int, default=None,
                    help="KVzip columns scored by groups of this many queries beside the step")
args = parser.parse_args()

folder = str(resolve_model(args.model))
lengths = args.tokens or [2048, 4096]
chunks = args.replay_chunk or [REPLAY_CHUNK]
for c in chunks:  # a bad --replay-chunk / --replay-group is named before any work
    try:
        KVzip(replay_chunk=c, replay_group=args.replay_group)
    except ValueError as err:
        parser.error(str(err))
one = kv.GenerationConfig(max_new_tokens=1)


def measure(pipe: kv.Pipeline) -> dict[int, float]:
    return {n: statistics.median(pipe.generate(p, one).metrics[0].ttft_s
                                 for p in prompts_of(folder, args.repeats, n))
            for n in lengths}


ttft: dict[str, dict[int, float]] = {}
pipe = kv.Pipeline(folder, eviction=kv.CacheEvictionConfig(max_cache_size=0.25))
pipe.generate(prompts_of(folder, 1, 512)[0], one)  # warm-up
ttft["default"] = measure(pipe)
del pipe
if args.kvzap:
    for name, cfg in (("full cache", None),
                      ("kvzap", kv.CacheEvictionConfig(max_cache_size=0.25, importance="kvzap"))):
        pipe = kv.Pipeline(folder, eviction=cfg)
        pipe.generate(prompts_of(folder, 1, 512)[0], one)
        ttft[name] = measure(pipe)
        del pipe
if not args.no_kvzip:
    pipe = kv.Pipeline(folder, eviction=kv.CacheEvictionConfig(max_cache_size=0.25,
                                                               importance="kvzip"))
    evictor = pipe.backend.engine.evictor
    group = args.replay_group
    for c in chunks:
        evictor.spec = dataclasses.replace(
            evictor.spec, policy=with_replay_group(evictor.spec.policy, group, c))
        pipe.generate(prompts_of(folder, 1, 512)[0], one)  # warm-up (a group: its graphs)
        name = f"kvzip, steps of {c}" + (f" by groups of {group}" if group else "")
        ttft[name] = measure(pipe)
if args.heads:
    pipe = kv.Pipeline(folder, eviction=kv.CacheEvictionConfig(max_cache_size=0.25,
                                                               importance="streaming"))
    evictor = pipe.backend.engine.evictor
    evictor.spec = dataclasses.replace(
        evictor.spec, policy=KVzipHeads.from_array(load_or_calibrate(folder)))
    pipe.generate(prompts_of(folder, 1, 512)[0], one)
    ttft["kvzip-heads"] = measure(pipe)
names = [k for k in ttft if k != "default"]
print("| prompt tokens | TTFT default (s) | " + " | ".join(
    f"TTFT {k} (s) | / default" for k in names) + " |")
print("|---|---|" + "---|---|" * len(names))
for n in lengths:
    d = ttft["default"][n]
    print(f"| {n} | {d:.2f} | " + " | ".join(
        f"{ttft[k][n]:.2f} | {ttft[k][n] / d:.2f}x" for k in names) + " |")
