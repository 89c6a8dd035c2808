"""Full cache vs KVCrush on one long prompt.

python samples/compare_full_vs_kvcrush.py DOCUMENT.txt "question"
"""

import argparse
from pathlib import Path

import kvcrush_ov as kv

parser = argparse.ArgumentParser()
parser.add_argument("document", type=Path)
parser.add_argument("question")
parser.add_argument("--model", default="SmolLM2-135M-Instruct")
args = parser.parse_args()
prompt = f"{args.document.read_text()}\n\nQuestion: {args.question}"

for label, eviction in [("full cache", None),
                        ("KVCrush 25%", kv.CacheEvictionConfig(max_cache_size=0.25))]:
    out = kv.Pipeline(args.model, eviction=eviction).generate(prompt, max_new_tokens=64)
    print(f"{label}: {out.text.strip()!r}  KV held {out.cache.final_kv_bytes / 2**20:.1f} MiB")
