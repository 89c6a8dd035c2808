"""Generate text with KVCrush eviction: python samples/generate.py "prompt" [--model NAME]."""

import argparse

import kvcrush_ov as kv

parser = argparse.ArgumentParser()
parser.add_argument("prompt")
parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="registry name or folder")
parser.add_argument("--budget", type=float, default=0.25, help="fraction of the prompt kept")
args = parser.parse_args()

pipe = kv.Pipeline(
    args.model,
    eviction=kv.CacheEvictionConfig(max_cache_size=args.budget,
                                    kvcrush=kv.KVCrushConfig(budget=0.25)),
)
out = pipe.generate(args.prompt, max_new_tokens=128,
                    streamer=lambda s: print(s, end="", flush=True))
m = out.metrics[0]
print(f"\n\nTTFT {m.ttft_s:.2f} s, {m.tokens_per_s:.1f} tok/s, "
      f"KV held {out.cache.final_kv_bytes} bytes")
