"""A prompt longer than the whole KV cache, answered with eviction during prefill:
python samples/prefill_eviction.py [--model NAME] [--tokens 16384] [--cache-tokens 4096]
[--importance kvzip|kvzap] [--probe N] (snapkv: each part is ranked by the prompt's last 64
tokens, the question, run after it; --probe N another count, 0 none; kvzip: each part is replayed
and ranked by that, without the question; kvzap: every token ranked by the surrogate's prediction,
no replay, after `kvcrush-ov kvzap-train --model NAME`)."""

import argparse

import kvcrush_ov as kv
from kvcrush_ov.data import essays
from kvcrush_ov.demo import DETAIL, QUESTION

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="Qwen2.5-Coder-0.5B-Instruct", help="name or folder")
parser.add_argument("--tokens", type=int, default=16384, help="about this many prompt tokens")
parser.add_argument("--cache-tokens", type=int, default=4096, help="the whole KV cache")
parser.add_argument("--budget", type=int, default=2048, help="tokens a request keeps")
parser.add_argument("--importance", default="snapkv",
                    choices=["snapkv", "h2o", "kvzip", "kvzap"])
parser.add_argument("--probe", type=int, default=None,
                    help="prefill_probe_size (snapkv): the prompt's last N tokens rank each part "
                         "(default: the backend's own, 64)")
args = parser.parse_args()

# a long document (about 4 characters a token) with one fact in the middle, then the question
doc = "\n\n".join(essays().values())[:args.tokens * 4]
middle = doc.find(". ", len(doc) // 2) + 1
prompt = f"{doc[:middle]}{DETAIL}{doc[middle:]}\n\nQuestion: {QUESTION} Answer briefly."

pipe = kv.Pipeline(
    args.model,
    kv_cache=kv.KVCacheConfig(num_kv_blocks=args.cache_tokens // 32),  # 32-token blocks on CPU
    eviction=kv.CacheEvictionConfig(max_cache_size=args.budget, prefill_eviction=True,
                                    importance=args.importance, prefill_probe_size=args.probe),
)
out = pipe.generate(prompt, max_new_tokens=24)
m = out.metrics[0]
print(out.texts[0])
print(f"{m.num_input_tokens} prompt tokens on a {args.cache_tokens}-token cache: TTFT "
      f"{m.ttft_s:.1f} s, {m.num_evictions} evictions, peak KV {m.peak_kv_bytes / 2**20:.1f} MiB "
      f"of {pipe.cache_blocks * pipe.backend.engine.block_bytes / 2**20:.1f} MiB")
