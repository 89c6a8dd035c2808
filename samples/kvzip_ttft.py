"""What KVzip's replay costs: TTFT of the default eviction (SnapKV + KVCrush, which evicts right
after the prompt) vs KVzip (which replays the prompt first), at the same budget:
python samples/kvzip_ttft.py [--model NAME] [--tokens 2048 --tokens 4096] [--repeats 2]."""

import argparse
import statistics

import kvcrush_ov as kv
from kvcrush_ov.bench_serve import prompts_of
from kvcrush_ov.pipeline import resolve_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="name or folder")
parser.add_argument("--tokens", type=int, action="append", help="prompt length (repeat)")
parser.add_argument("--repeats", type=int, default=2, help="prompts per length (median)")
args = parser.parse_args()

folder = str(resolve_model(args.model))
lengths = args.tokens or [2048, 4096]
one = kv.GenerationConfig(max_new_tokens=1)
ttft: dict[str, dict[int, float]] = {}
for name, cfg in (("default", kv.CacheEvictionConfig(max_cache_size=0.25)),
                  ("kvzip", kv.CacheEvictionConfig(max_cache_size=0.25, importance="kvzip"))):
    pipe = kv.Pipeline(folder, eviction=cfg)
    pipe.generate(prompts_of(folder, 1, 512)[0], one)  # warm-up
    ttft[name] = {n: statistics.median(pipe.generate(p, one).metrics[0].ttft_s
                                       for p in prompts_of(folder, args.repeats, n))
                  for n in lengths}
    del pipe
print("| prompt tokens | TTFT default (s) | TTFT kvzip (s) | kvzip / default |")
print("|---|---|---|---|")
for n in lengths:
    d, z = ttft["default"][n], ttft["kvzip"][n]
    print(f"| {n} | {d:.2f} | {z:.2f} | {z / d:.2f}x |")
